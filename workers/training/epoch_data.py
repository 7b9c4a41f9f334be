"""Per-epoch training data with augmentation: records → augmented records → encoded rows, one per record.

Each epoch gets its own lazily executed Ray Data pipeline, so augmentation and image preprocessing run in
Ray Data tasks ahead of the train workers (which never decode images) and no epoch is held in memory before
it is needed. Every row carries the `aug_key` of its augmented record: the student trains on exactly the
batch its teachers answer for (online distillation), and the teacher-output cache keys answers by it.
"""

from __future__ import annotations

import json

import numpy as np
import ray.data
from transformers import ProcessorMixin

from workers.data.augment import AugmentConfig, augment_record
from workers.models.prompts import encode_with, record_units

RECORDS_PER_TASK = 16


def encode_augmented(batch: dict[str, np.ndarray], processor: ProcessorMixin, epoch: int, seed: int,
                     cfg: AugmentConfig, also: dict[str, ProcessorMixin] | None = None) -> dict[str, np.ndarray]:
    """Ray Data map over JSON-encoded records: the same (record id, epoch, seed, cfg) gives the same rows, encoded
    by `processor` and by each of `also` under its prefix (`workers.models.prompts.encode_with`)."""
    units = []
    for blob in batch["record"]:
        aug = augment_record(json.loads(blob), epoch, seed, cfg)  # image in memory: nothing written
        # the augmented record's option order is its label order: shuffled options keep their labels
        (unit,) = record_units([{**aug, "image": aug["source_image"]}])
        units.append({**unit, "image_array": aug["image_array"], "aug_key": aug["aug_key"]})
    out = encode_with(units, processor, also)
    for prefix in ["", *(also or {})]:
        out[prefix + "aug_key"] = np.array([u["aug_key"] for u in units])
    return out


def epoch_datasets(records: list[dict], processor: ProcessorMixin, epochs: int, seed: int,
                   cfg: AugmentConfig, also: dict[str, ProcessorMixin] | None = None) -> list[ray.data.Dataset]:
    """One lazy dataset per epoch (records go as JSON strings: Arrow cannot type the mixed `facts` field)."""
    rows = [{"record": json.dumps(r)} for r in records]
    return [ray.data.from_items(rows).map_batches(
                encode_augmented, fn_kwargs={"processor": processor, "epoch": e, "seed": seed, "cfg": cfg,
                                             "also": also},
                batch_size=RECORDS_PER_TASK, batch_format="numpy")
            for e in range(epochs)]
