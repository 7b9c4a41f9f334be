"""What runs inside Ray processes: teacher actors, the student's training loop, models, losses, data and
augmentation. Nothing here imports the orchestrator.

Root modules: `contract` (the frozen jobs the orchestrator hands over) and `losses` (the divergences, pure
tensor maths).

May import: workers.contract, workers.losses.
"""
