"""The loops a Ray Train worker runs, by a reference that costs nothing to import.

A function is pickled by module and name, so every process that builds a `TorchTrainer` imports the module
its loop lives in: the driver, and a sweep trial's process, which only builds and fits the trainer. These
wrappers live in a module with no imports, so only the train worker, which runs the loop, imports
transformers and the model code (several CPU seconds per process on a 2-core machine).
"""

from __future__ import annotations


def train_loop_per_worker(cfg: dict) -> dict:
    """`workers.training.loop.train_loop_per_worker`: one task stage (`cfg["job"]`, a `StageJob`)."""
    from workers.training.loop import train_loop_per_worker as loop

    return loop(cfg)


def grounding_loop_per_worker(cfg: dict) -> dict:
    """`workers.training.grounding.grounding_loop_per_worker`: one grounding pre-training stage."""
    from workers.training.grounding import grounding_loop_per_worker as loop

    return loop(cfg)
