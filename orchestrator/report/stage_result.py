"""One finished stage as the pipeline records it (`<run dir>/stages/<name>.json`) and the report reads it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StageResult:
    """What a stage left: its level and kind, fingerprint, final validation metrics (rank 0's), model dir, MLflow
    run and wall time; a task stage also its test metrics without and with its mapping shift, the shift, the
    scores per benchmark type, parameters, inference samples/s and per-unit test decisions (`test_units`: task,
    record id, target and margin of each, for the report's paired tests). None where a stage has no such part
    (grounding: no test) or a stage recorded before it was kept."""

    level: str
    kind: str
    fingerprint: str
    val: dict
    model_dir: str
    mlflow_run_id: str
    wall_s: float
    test: dict | None = None
    test_shift: dict | None = None
    shift: dict | None = None
    test_types: dict | None = None
    test_shift_types: dict | None = None
    params: int | None = None
    samples_per_s: float | None = None
    test_units: dict | None = None

    def to_json(self) -> dict:
        """The stage file's content: the parts the stage has."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> StageResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
