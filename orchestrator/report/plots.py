"""The run's figures (PNG in `<run dir>/plots`, also logged to MLflow): training curves per stage,
reliability before/after the mapping shift, confusion matrices, and the report table as a bar chart."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from orchestrator.report.stage_result import StageResult  # noqa: E402
from workers.inference.calibration import sigmoid  # noqa: E402

TASKS = ("hallucination", "factuality")
VAL_KEYS = tuple(f"val/{t}/f1" for t in TASKS)
MARKERS_UNDER = 60  # a series with at most this many logged points gets a marker on each


def render_plots(run_dir: Path, rows: dict[str, StageResult], report: dict, uri: str) -> list[Path]:
    """All figures for a finished run; `rows` are the stage results, `report` the table written from them."""
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    last = rows[list(rows)[-1]]
    return [training_curves(rows, uri, out / "training_curves.png"),
            reliability(last, out / "reliability.png"),
            confusion(last, out / "confusion.png"),
            table_bars(report, out / "ablation.png")]


def training_curves(rows: dict[str, StageResult], uri: str, path: Path) -> Path:
    """Per stage, one column: every loss term against the step (teacher_wait_s on a second axis) above the
    validation macro-F1 per task at the same steps (`val/*`: every `eval_every` steps and each epoch's end)."""
    client = MlflowClient(uri)
    return _save(curves_figure({name: stage_history(client, row.mlflow_run_id) for name, row in rows.items()}),
                 path)


def stage_history(client: MlflowClient, run_id: str) -> dict[str, tuple[list[int], list[float]]] | None:
    """Every logged step of a stage's loss terms, teacher wait and validation macro-F1 per task; None when the
    stage was recorded in another tracking store (URI changed since)."""
    try:
        keys = sorted(client.get_run(run_id).data.metrics)
    except MlflowException:
        return None
    wanted = [k for k in keys if k.startswith("loss") or k == "teacher_wait_s" or k in VAL_KEYS]
    return {k: _history(client, run_id, k) for k in wanted}


def curves_figure(histories: dict[str, dict[str, tuple[list[int], list[float]]] | None]) -> plt.Figure:
    """The training-curves figure from each stage's history (`stage_history`): every logged point is drawn, with a
    marker when a series has few, and each loss term's raw values faint under their smoothed line, so a stage of
    a dozen steps shows its points and a long one its trend."""
    fig, axes = plt.subplots(2, len(histories), figsize=(4.8 * len(histories), 6.2), squeeze=False, sharex="col")
    for (loss_ax, val_ax), (name, history) in zip(axes.T, histories.items()):
        if history is None:
            loss_ax.set(title=f"{name}\n(no history in this store)")
            continue
        _loss_panel(loss_ax, history)
        loss_ax.set_title(name)
        for key in [k for k in VAL_KEYS if k in history]:
            steps, values = history[key]
            val_ax.plot(steps, values, "o-", ms=3, lw=1, label=key.split("/")[1])
        val_ax.set(xlabel="step", ylabel="validation macro-F1", ylim=(0, 1))
        if any(k in history for k in VAL_KEYS):
            val_ax.legend(fontsize=6, loc="lower right")
    return fig


def _loss_panel(ax: plt.Axes, history: dict[str, tuple[list[int], list[float]]]) -> None:
    for key in [k for k in history if k.startswith("loss")]:
        steps, values = history[key]
        marker = "o" if len(steps) <= MARKERS_UNDER else None
        raw, = ax.plot(steps, values, lw=0.8, alpha=0.35, marker=marker, ms=3)
        if len(steps) >= 3:
            ax.plot(steps, smoothed(values), color=raw.get_color(), lw=1.4, label=key)
        else:
            raw.set(alpha=1.0, label=key)
    ax.set(ylabel="loss (faint: as logged; line: smoothed)")
    if "teacher_wait_s" in history:
        steps, values = history["teacher_wait_s"]
        twin = ax.twinx()
        twin.plot(steps, values, color="grey", lw=0.8, ls=":", label="teacher_wait_s",
                  marker="." if len(steps) <= MARKERS_UNDER else None)
        twin.set_ylabel("teacher_wait_s")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="upper right")


def smoothed(values: list[float]) -> np.ndarray:
    """Centred moving average over about √n points (odd; fewer at the ends), so a dozen points are smoothed a
    little, a thousand a lot, and the line does not lag behind a falling loss as a running average would."""
    x = np.asarray(values, dtype=float)
    half = int(np.sqrt(len(x))) // 2
    kernel = np.ones(2 * half + 1)
    return np.convolve(x, kernel, mode="same") / np.convolve(np.ones_like(x), kernel, mode="same")


def _history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def reliability(row: StageResult, path: Path, bins: int = 10) -> Path:
    """Observed positive rate against mean P(positive) per probability bin, before and after the shift."""
    units, offsets = row.test_units, row.shift["offsets"]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(8.4, 3.8), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        margin, target = _task_arrays(units, task)
        ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)
        for label, offset in (("before shift", 0.0), ("after shift", offsets.get(task, 0.0))):
            prob = sigmoid(margin + offset)
            idx = np.clip((prob * bins).astype(int), 0, bins - 1)
            used = [b for b in range(bins) if (idx == b).any()]
            ax.plot([prob[idx == b].mean() for b in used], [target[idx == b].mean() for b in used], "o-",
                    ms=3, label=f"{label} ({offset:+.2f})")
        ax.set(title=f"{task} ({row.level})", xlabel="mean P(positive)", ylabel="positive rate",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    return _save(fig, path)


def confusion(row: StageResult, path: Path) -> Path:
    """2×2 counts per task of the shifted decisions (rows: truth, columns: prediction)."""
    units, offsets = row.test_units, row.shift["offsets"]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(7, 3.4), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        margin, target = _task_arrays(units, task)
        pred = (sigmoid(margin + offsets.get(task, 0.0)) >= 0.5).astype(int)
        counts = np.array([[np.sum((target == t) & (pred == p)) for p in (0, 1)] for t in (0, 1)])
        ax.imshow(counts, cmap="Blues")
        for (t, p), n in np.ndenumerate(counts):
            ax.text(p, t, str(n), ha="center", va="center")
        ax.set(title=task, xticks=[0, 1], yticks=[0, 1], xticklabels=["no", "yes"], yticklabels=["no", "yes"],
               xlabel="predicted", ylabel="true")
    return _save(fig, path)


def _task_arrays(units: dict, task: str) -> tuple[np.ndarray, np.ndarray]:
    sel = np.array(units["task"]) == task
    return np.array(units["margin"], dtype=float)[sel], np.array(units["target"], dtype=int)[sel]


def table_bars(report: dict, path: Path) -> Path:
    """Macro-F1 per report row, one bar group per task: the ablation table at a glance."""
    names = list(report["rows"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 3.8))
    width = 0.8 / len(TASKS)
    for i, task in enumerate(TASKS):
        f1 = [report["rows"][n][task]["f1"] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + i * width, f1, width, label=task)
    ax.set_xticks(np.arange(len(names)) + width * (len(TASKS) - 1) / 2, names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="macro-F1 (test)", ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
