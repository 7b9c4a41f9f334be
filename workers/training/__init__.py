"""Training inside a Ray Train worker (or in process): the loop and its context, the stage objective,
optimizer, checkpoints, step logs, per-epoch data, grounding and base pretraining, and the entry points Ray
imports.

May import: workers.contract, workers.losses, workers.data, workers.models, workers.inference, workers.teachers.
"""
