"""Binary decision metrics: macro-F1, accuracy, AUROC, expected calibration error (numpy only)."""

from __future__ import annotations

import numpy as np


def macro_f1(targets: np.ndarray, preds: np.ndarray) -> float:
    """Mean of the F1 of the positive and of the negative class."""
    scores = []
    for cls in (0, 1):
        tp = np.sum((preds == cls) & (targets == cls))
        fp = np.sum((preds == cls) & (targets != cls))
        fn = np.sum((preds != cls) & (targets == cls))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann–Whitney) statistic, ties averaged."""
    pos, neg = int(np.sum(targets == 1)), int(np.sum(targets == 0))
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[targets == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def ece(targets: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(positive), equal-width bins over [0, 1]."""
    conf = np.where(probs >= 0.5, probs, 1 - probs)
    correct = (probs >= 0.5).astype(int) == targets
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def binary_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """All four metrics for P(positive) against 0/1 targets."""
    targets = np.asarray(targets, dtype=int)
    probs = np.asarray(probs, dtype=float)
    preds = (probs >= threshold).astype(int)
    return {
        "f1": macro_f1(targets, preds),
        "accuracy": float(np.mean(preds == targets)),
        "auroc": auroc(targets, probs),
        "ece": ece(targets, probs),
    }
