"""Models and what feeds them: the five families, level shapes, prompts and their lengths, model dirs,
the fixed tokenizer, LoRA, weight identity.

May import: workers.contract, workers.data.
"""
