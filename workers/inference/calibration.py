"""Mapping shift-enhanced inference: a per-task offset on the label-word margin, calibrated on validation.

The model's decision score is the margin m = logit(yes) − logit(no), so P(positive) = sigmoid(m). The mapping
from margin to decision is shifted by a per-task offset b: positive iff m + b ≥ 0, P(positive) = sigmoid(m + b).
b is chosen on validation data to maximise macro-F1 (ties go to the smallest shift) and is stored in the model
dir's `hkd.json` under `mapping_shift`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from workers.inference.metrics import binary_metrics

SHIFT_KEY = "mapping_shift"
HKD_JSON = "hkd.json"
_BELOW_HALF = np.nextafter(0.5, 0.0)
_SIDE = re.compile(r"\b(left|right)\b(?= of\b)|(?<=\bthe )(left|right)\b", re.IGNORECASE)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic, with sigmoid(x) ≥ 0.5 exactly when x ≥ 0 (decisions match the margin)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), np.minimum(e / (1.0 + e), _BELOW_HALF))


def _macro_f1_at(margins: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Macro-F1 of `margin ≥ t` for every t at once (sorted margins + cumulative positive counts)."""
    order = np.argsort(margins, kind="mergesort")
    m, y = margins[order], targets[order]
    pos_below = np.concatenate([[0], np.cumsum(y)])  # positives among the k smallest margins
    k = np.searchsorted(m, thresholds, side="left")  # units with margin < t are called negative
    n, n_pos = len(m), int(y.sum())
    fn = pos_below[k]
    tn = k - fn
    tp = n_pos - fn
    fp = (n - k) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_pos = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f1_neg = np.where(tn > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
    return (f1_pos + f1_neg) / 2


def calibrate(margins: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Offset b maximising macro-F1 of `m + b ≥ 0`, with F1 and ECE before (b = 0) and after.

    Candidate thresholds are 0, the midpoints between consecutive distinct margins and one beyond each end;
    among equally good thresholds the one closest to 0 wins, so f1_after ≥ f1_before always.
    """
    margins = np.asarray(margins, dtype=np.float64)
    targets = np.asarray(targets, dtype=int)
    if len(margins) == 0 or len(margins) != len(targets):
        raise ValueError(f"need equally many margins and targets, got {len(margins)} and {len(targets)}")
    distinct = np.unique(margins)
    ends = [distinct[0] - 1.0, distinct[-1] + 1.0]  # all positive / all negative
    thresholds = np.concatenate([[0.0], (distinct[1:] + distinct[:-1]) / 2, ends])
    f1 = _macro_f1_at(margins, targets, thresholds)
    best = np.flatnonzero(f1 == f1.max())
    offset = 0.0 - float(thresholds[best[np.argmin(np.abs(thresholds[best]))]])
    before = binary_metrics(targets, sigmoid(margins))
    after = binary_metrics(targets, sigmoid(margins + offset))
    return {"offset": offset, "f1_before": before["f1"], "f1_after": after["f1"],
            "ece_before": before["ece"], "ece_after": after["ece"]}


def load_shift(model_dir: str | Path) -> dict[str, float]:
    """Per-task offsets stored in the model dir's hkd.json; empty when there are none (or no such file)."""
    path = Path(model_dir) / HKD_JSON
    if not path.is_file():
        return {}
    return {task: float(b) for task, b in json.loads(path.read_text()).get(SHIFT_KEY, {}).items()}


def store_shift(model_dir: str | Path, shift: dict[str, float]) -> None:
    """Merge per-task offsets into hkd.json (other keys and other tasks kept), written atomically."""
    path = Path(model_dir) / HKD_JSON
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta[SHIFT_KEY] = {**meta.get(SHIFT_KEY, {}), **{t: float(b) for t, b in shift.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{HKD_JSON}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def flip_text(text: str) -> str:
    """Swap left/right in the spatial phrases that a horizontal flip mirrors: 'left of' ↔ 'right of',
    'the left' ↔ 'the right' (so 'to the left' ↔ 'to the right'); other uses ('what is left') are kept."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.capitalize() if word[0].isupper() else new
    return _SIDE.sub(swap, text)
