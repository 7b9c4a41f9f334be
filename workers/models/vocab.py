"""The one fixed tokenizer of the tiny levels: trained on the pretraining text plus every fixed word of the
prompts, the generator, augmentation and grounding (each of them one token), never on a run's own data. The shipped
bases carry it; a tiny level built from config gets the same one, so any two tiny levels share it."""

from __future__ import annotations

import functools
import re

from transformers import PreTrainedTokenizerFast

from workers.data import augment, pretrain_corpus, synth
from workers.models.model_dirs import build_tokenizer
from workers.models.prompts import GROUNDING_PROMPT, record_units

# the scenes the corpus sample is drawn from (configs/bases.yaml's): only which subwords are frequent depends on it
CORPUS_SPEC = synth.SynthSpec(image_size=84, max_objects=3)


def fixed_words(seed: int = 0, spec: synth.SynthSpec = CORPUS_SPEC,
                sample: list[str] | None = None) -> tuple[str, ...]:
    """Every word of the prompts' templates, the generator's vocabulary, augmentation's paraphrases, the grounding
    prompt and the pretraining text (`sample`: its texts when the caller has them), read from the code's own
    strings, never listed by hand."""
    empty = [{"id": "x", "task": "hallucination", "image": "", "caption": "", "options": []},
             {"id": "y", "task": "factuality", "image": "", "context": "", "claim": ""}]
    texts = ([u["text"] + " " + u["answer"] for u in record_units(empty)] + synth.vocabulary() + augment.vocabulary()
             + [GROUNDING_PROMPT] + (sample if sample is not None else pretrain_corpus.texts(seed, 2000, spec)))
    return tuple(sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", t)}))


@functools.lru_cache(maxsize=4)
def fixed_tokenizer(vocab_size: int = 1024, seed: int = 0,
                    spec: synth.SynthSpec = CORPUS_SPEC) -> PreTrainedTokenizerFast:
    """The tokenizer of the tiny levels (deterministic: the same call gives the same tokenizer.json)."""
    sample = pretrain_corpus.texts(seed, 2000, spec)
    return build_tokenizer(sample, vocab_size, fixed_words(seed, spec, sample))
