"""Bootstrap intervals and paired tests over test records (numpy only).

Why: on 50 test records per task a macro-F1 moves by about ±0.13 from the draw of the records alone, so a report
that compares rows must say which differences that noise could have made. The unit of resampling is the record,
not the decision: a Task 1 record's options share one image and one forward, so they move together. Two rows are
compared on the same resampled records (paired), which cancels the records' own difficulty. The number of
resamples and the seed are fixed, so the same predictions always give the same intervals.

`paired_gain` is the entry point for other scripts (the report, `bench/claim.py`): per-decision targets, the two
rows' P(positive), and which record each decision belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
METRICS = ("f1", "accuracy", "auroc")
BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable at this test size"
_CELLS = 4_000_000  # resamples × decisions held in memory at once


@dataclass(frozen=True)
class Interval:
    """A metric on the test set as it is (`value`) and its bootstrap interval [`low`, `high`]."""

    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Gain:
    """metric(a) − metric(b) on the test set (`difference`) and its paired bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """'better' (a over b) when the whole interval is above 0, 'worse' when below, else not distinguishable."""
        return BETTER if self.low > 0 else WORSE if self.high < 0 else NOT_DISTINGUISHABLE

    def as_dict(self) -> dict:
        return {"difference": self.difference, "interval": [self.low, self.high], "verdict": self.verdict}


def interval(targets: Sequence[int], scores: Sequence[float], records: Sequence, metric: str = "f1",
             resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Percentile bootstrap interval of one row's `metric` ('f1': macro-F1, 'accuracy', 'auroc'), resampling
    whole records. `scores` are P(positive) per decision (decision: score ≥ 0.5); `records[i]` names decision
    i's record (any hashable: the record id)."""
    value, draws = bootstrap_draws(targets, [scores], records, metric, resamples, seed)
    low, high = percentile_interval(draws[0], level)
    return Interval(float(value[0]), low, high)


def paired_gain(targets: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float], records: Sequence,
                metric: str = "f1", resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Gain:
    """How much row a beats row b on the same test decisions: metric(a) − metric(b) and its paired bootstrap
    interval (both rows scored on the same resampled records each time). Score both rows the same way (both
    without the mapping shift, or each with its own). Identical rows give exactly [0, 0]; a constant row (every
    score equal) is the guess that ignores the input."""
    value, draws = bootstrap_draws(targets, [scores_a, scores_b], records, metric, resamples, seed)
    low, high = percentile_interval(draws[0] - draws[1], level)
    return Gain(float(value[0] - value[1]), low, high)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap draws; resamples where the metric is undefined (AUROC of a resample
    with one class only) are left out."""
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_draws(targets: Sequence[int], rows: list[Sequence[float]], records: Sequence, metric: str = "f1",
                    resamples: int = RESAMPLES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the metric on the test set, and on each of `resamples` draws of the records with replacement
    (the same draws for every row, so any combination of rows is paired: `bench/claim.py`'s seed-mean gain).
    Returns (values (rows,), draws (rows, resamples))."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: one of {', '.join(METRICS)}")
    target = np.asarray(targets, dtype=int)
    scores = [np.asarray(s, dtype=float) for s in rows]
    if any(len(s) != len(target) for s in scores) or len(records) != len(target):
        raise ValueError(f"{len(target)} targets, {[len(s) for s in scores]} scores, {len(records)} record ids")
    _, codes = np.unique(np.asarray([str(r) for r in records]), return_inverse=True)
    n_records = int(codes.max()) + 1 if len(codes) else 0
    whole = np.ones((1, len(target)))
    values = np.array([_weighted(metric, target, s, whole)[0] for s in scores])
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS // max(1, len(target)))
    draws = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picks = rng.integers(0, n_records, size=(size, n_records)) + n_records * np.arange(size)[:, None]
        counts = np.bincount(picks.ravel(), minlength=size * n_records).reshape(size, n_records)
        weights = counts[:, codes].astype(float)  # each decision counts as often as its record was drawn
        draws.append([_weighted(metric, target, s, weights) for s in scores])
    if not draws:
        return values, np.empty((len(rows), 0))
    return values, np.stack([np.concatenate(per_row) for per_row in zip(*draws)])


def _weighted(metric: str, target: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`metric` under each row of decision weights (resamples × decisions); with weights all 1 it equals
    `workers.inference.metrics` on the decisions themselves."""
    if metric == "auroc":
        return weighted_auroc(target, scores, weights)
    pred = scores >= 0.5
    cells = np.stack([pred & (target == 1), pred & (target == 0), ~pred & (target == 1), ~pred & (target == 0)],
                     axis=1).astype(float)
    tp, fp, fn, tn = (weights @ cells).T
    if metric == "accuracy":
        total = tp + fp + fn + tn
        return np.divide(tp + tn, total, out=np.full_like(total, np.nan), where=total > 0)
    f1_pos = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=tp > 0)
    f1_neg = np.divide(2 * tn, 2 * tn + fn + fp, out=np.zeros_like(tn), where=tn > 0)
    return (f1_pos + f1_neg) / 2


def weighted_auroc(target: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under each row of decision weights (ties count one half): the weighted Mann–Whitney statistic,
    NaN where a row's weights leave one class empty."""
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.array([], dtype=int)
    w = weights[:, order]
    positive = target[order] == 1
    pos = np.add.reduceat(w * positive, starts, axis=1) if len(starts) else np.zeros((len(w), 0))
    neg = np.add.reduceat(w * ~positive, starts, axis=1) if len(starts) else np.zeros((len(w), 0))
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full_like(pairs, np.nan), where=pairs > 0)
