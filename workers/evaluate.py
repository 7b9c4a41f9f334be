"""Score records with a model dir in the current process (test splits, `hkd evaluate`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from workers.models import label_word_ids, load_model_dir
from workers.prompts import collate, encode_units, expand_units
from workers.train_loop import predict, task_metrics


def score_records(model_dir: str | Path, records: list[dict], batch_size: int = 32,
                  threads: int | None = None) -> dict:
    """P(positive) per unit plus metrics per task (when labelled) and inference samples/s."""
    if threads:
        torch.set_num_threads(threads)
    model, processor = load_model_dir(model_dir)
    label_ids = label_word_ids(processor.tokenizer)
    units = expand_units(records)
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    start = time.perf_counter()
    batches = (collate(encode_units(units[i:i + batch_size], processor), pad_id, image_id)
               for i in range(0, len(units), batch_size))
    pred = predict(model, batches, label_ids)
    elapsed = time.perf_counter() - start
    tasks = np.array([u["task"] for u in units])
    labelled = pred["target"] >= 0
    metrics = {}
    if labelled.any():
        metrics = task_metrics({k: v[labelled] for k, v in pred.items()}, tasks[labelled])
    return {"units": units, "prob": pred["prob"], "metrics": metrics,
            "samples_per_s": len(units) / max(elapsed, 1e-9)}
