"""Score records with a model dir in the current process (test splits, `hkd evaluate|predict|calibrate`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

from workers.data.records import load_rgb
from workers.inference.calibration import (
    calibrate,
    flip_text,
    load_shift,
    sigmoid,
    store_shift,
)
from workers.inference.logits import position_logits, task_metrics
from workers.inference.metrics import binary_metrics
from workers.models.model_dirs import label_word_ids, load_model_dir
from workers.models.prompts import collate_records, encode_records, record_units


def score_records(model_dir: str | Path, records: list[dict], batch_size: int = 32,
                  threads: int | None = None, shift: dict[str, float] | None = None,
                  tta: bool = False, trust_remote_code: bool = False) -> dict:
    """Margin and P(positive) per decision, metrics per task (when labelled) and inference decisions/s.

    One forward per record: `positions` lists the decisions in order (one per supervised position: Task 1 one
    per option, Task 2 one), each `{uid: "<record id>#<slot>", record_id, task, target}`. `margin` is
    logit(yes) − logit(no) there, averaged with the horizontally flipped view when `tta` (image mirrored,
    left/right swapped in the user text and in the options). `prob` = sigmoid(margin + shift[task]), and the metrics use it; `shift`
    defaults to the offsets stored in the model dir (`{}` scores without a shift). Pixels stay fp32 (not the
    object store's fp16), so a margin is the plain model's forward on the record (docs/interop.md).
    """
    if threads:
        torch.set_num_threads(threads)
    shift = load_shift(model_dir) if shift is None else shift
    model, processor = load_model_dir(model_dir, trust_remote_code=trust_remote_code)
    label_ids = label_word_ids(processor.tokenizer)
    units = record_units(records)
    positions = [{"uid": f"{u['record_id']}#{slot}", "record_id": u["record_id"], "task": u["task"],
                  "target": target} for u in units for slot, target in enumerate(u["targets"])]
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id

    def margins_of(batch_units: list[dict]) -> np.ndarray:
        batches = (collate_records(encode_records(batch_units[i:i + batch_size], processor, np.float32), pad_id,
                                   image_id) for i in range(0, len(batch_units), batch_size))
        return _margins(model, batches, label_ids)

    start = time.perf_counter()
    margin = margins_of(units)
    if tta:
        with tempfile.TemporaryDirectory(prefix="hkd-tta-") as tmp:
            margin = (margin + margins_of(_flipped(units, Path(tmp)))) / 2
    elapsed = time.perf_counter() - start
    return {"positions": positions, "margin": margin, **shifted(positions, margin, shift),
            "samples_per_s": len(positions) / max(elapsed, 1e-9)}


def calibrate_model(model_dir: str | Path, records: list[dict], threads: int | None = None, tta: bool = False,
                    trust_remote_code: bool = False) -> dict:
    """Mapping shift: per-task offset on the label-word margin that maximises macro-F1 on labelled `records`
    (`calibration.calibrate`), stored in the model dir (used by `hkd evaluate` and `hkd predict`).
    Returns {offsets: {task: b}, val: {task: calibrate's result}, n: {task: decisions}}."""
    scored = score_records(model_dir, records, threads=threads, shift={}, tta=tta, trust_remote_code=trust_remote_code)
    tasks = np.array([p["task"] for p in scored["positions"]])
    targets = np.array([p["target"] for p in scored["positions"]])
    names = sorted(set(tasks.tolist()))
    per_task = {task: calibrate(scored["margin"][tasks == task], targets[tasks == task]) for task in names}
    offsets = {task: c["offset"] for task, c in per_task.items()}
    store_shift(model_dir, offsets)
    return {"offsets": offsets, "val": per_task, "n": {task: int(np.sum(tasks == task)) for task in names}}


def shifted(positions: list[dict], margin: np.ndarray, shift: dict[str, float]) -> dict:
    """P(positive) = sigmoid(margin + shift[task]) and the metrics per task on the labelled decisions
    (`score_records`' positions); lets a caller score another shift of the same margins without running the
    model again."""
    tasks = np.array([p["task"] for p in positions])
    prob = sigmoid(margin + np.array([shift.get(t, 0.0) for t in tasks.tolist()]))
    target = np.array([p["target"] for p in positions])
    labelled = target >= 0
    metrics = {}
    if labelled.any():
        metrics = task_metrics({"prob": prob[labelled], "target": target[labelled]}, tasks[labelled])
    return {"prob": prob, "metrics": metrics}


@torch.no_grad()
def _margins(model: torch.nn.Module, batches: Iterable[dict], label_ids: tuple[int, int]) -> np.ndarray:
    """logit(positive word) − logit(negative word) at every supervised position, in order (float64)."""
    model.eval()
    out = [(logits[:, label_ids[0]] - logits[:, label_ids[1]]).double().numpy()
           for logits in (position_logits(model, b) for b in batches)]
    return np.concatenate(out)


def _flipped(units: list[dict], tmp: Path) -> list[dict]:
    """The records' mirror view: each distinct image mirrored once into `tmp`, left/right swapped in the user
    text and in the options (`answer`; the option markers carry no side word)."""
    paths: dict[str, str] = {}
    for u in units:
        if u["image"] not in paths:
            paths[u["image"]] = str(tmp / f"{len(paths)}.png")
            ImageOps.mirror(load_rgb(u["image"])).save(paths[u["image"]])
    return [{**u, "image": paths[u["image"]], "text": flip_text(u["text"]), "answer": flip_text(u["answer"])}
            for u in units]


def prediction_rows(records: list[dict], scored: dict) -> list[dict]:
    """One output row per record, in order: Task 1 `{id, hallucinated, scores}`, Task 2 `{id, label, score}`;
    scores are P(positive) after the shift and decisions are score ≥ 0.5."""
    probs: dict[str, list[float]] = {}
    for position, p in zip(scored["positions"], scored["prob"].tolist()):
        probs.setdefault(position["record_id"], []).append(p)
    rows = []
    for rec in records:
        p = probs[rec["id"]]
        if rec["task"] == "hallucination":
            rows.append({"id": rec["id"], "hallucinated": [s >= 0.5 for s in p], "scores": p})
        else:
            rows.append({"id": rec["id"], "label": p[0] >= 0.5, "score": p[0]})
    return rows


def score_predictions(rows: list[dict], records: list[dict]) -> dict[str, dict[str, float]]:
    """Metrics per task of prediction rows (as `prediction_rows` writes them) against labelled records."""
    by_id = {r["id"]: r for r in rows}
    scores: dict[str, list[float]] = {}
    targets: dict[str, list[int]] = {}
    for rec in records:
        if rec["id"] not in by_id:
            raise ValueError(f"no prediction for record {rec['id']!r}")
        row = by_id[rec["id"]]
        if rec["task"] == "hallucination":
            rec_scores, rec_targets = row["scores"], rec["hallucinated"]
            if len(rec_scores) != len(rec_targets):
                raise ValueError(f"record {rec['id']!r}: {len(rec_scores)} scores for {len(rec_targets)} options")
        else:
            rec_scores, rec_targets = [row["score"]], [rec["label"]]
        scores.setdefault(rec["task"], []).extend(rec_scores)
        targets.setdefault(rec["task"], []).extend(int(t) for t in rec_targets)
    return {task: binary_metrics(np.array(targets[task]), np.array(scores[task])) for task in sorted(scores)}
