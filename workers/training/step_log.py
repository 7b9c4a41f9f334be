"""Step logging of the training loops: per-step metrics buffered to the stage's MLflow run, the progress file
the driver's step bar polls, steady-state throughput, and counters summed over the workers."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

FLUSH_S = 1.0  # per-step metrics reach MLflow at least this often (live curves; little lost to a crash)


class StepLogger:
    """Buffers per-step metrics and sends them to the stage's MLflow run in batches (rank 0 only), at
    least every `FLUSH_S` seconds and before each checkpoint. `on_log(step, values)` (rank 0) sees the same
    metrics as MLflow, when they are logged: how an in-process run hands its curve to its caller, with or
    without `tracking`."""

    def __init__(self, tracking: dict | None, enabled: bool, progress: str | None = None, total: int = 0,
                 on_log: Callable[[int, dict[str, float]], None] | None = None):
        self.client = None
        self.on_log = on_log if enabled else None
        self.buffer: list = []
        # The driver's step bar polls this file (orchestrator/report/progress.py): rank 0 writes it twice a second.
        self.progress = Path(progress) if enabled and progress else None
        self.total, self.last_write = total, 0.0
        self.shown: dict[str, float] = {}  # the latest loss and validation F1, for the driver's progress line
        self.flushed_at = time.monotonic()
        if enabled and tracking:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def log(self, step: int, values: dict[str, float], every: int) -> None:
        shown = {k: float(v) for k, v in values.items()
                 if k in ("loss", "loss_grounding") or (k.startswith("val/") and k.endswith("f1"))}
        self.shown.update(shown)
        if self.progress and (time.monotonic() - self.last_write > 0.5 or step == self.total
                              or any(k.startswith("val/") for k in shown)):
            self.last_write = time.monotonic()
            tmp = self.progress.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "total": self.total, **self.shown}))
            tmp.replace(self.progress)
        if step % every:
            return
        if self.on_log is not None and values:
            self.on_log(step, {k: float(v) for k, v in values.items()})
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in values.items())
        if len(self.buffer) >= 200 or time.monotonic() - self.flushed_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []
        self.flushed_at = time.monotonic()


class Throughput:
    """Steady-state training samples/s: wall time between consecutive steps (data and teacher waits
    included, evaluation excluded), skipping each epoch's first step, which pays for pipeline start-up."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step, self.seconds, self.steps, self.last = samples_per_step, 0.0, 0, None

    def resume(self) -> None:
        self.last = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.seconds += now - self.last
            self.steps += 1
        self.last = now

    def rate(self) -> float:
        return self.samples_per_step * self.steps / self.seconds if self.seconds else float("nan")


def summed(stats: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Counters summed over the workers (each counts only its own shard's batches)."""
    if world == 1 or not stats:
        return stats
    import torch.distributed as dist

    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, values.tolist()))
