"""A trained stage on the test split: its metrics without and with the mapping shift calibrated on validation,
per benchmark type, and the per-unit margins the report's paired tests read."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from workers.inference.evaluate import calibrate_model, score_records, shifted
from workers.inference.type_scores import type_scores
from workers.models.model_dirs import count_parameters, load_model_dir


def test_stage(out_dir: Path, splits: dict[str, list[dict]], remote_code: bool) -> dict:
    """Test metrics without and with the mapping shift calibrated on validation (logged to the active run),
    and both broken down by benchmark type (`workers.inference.type_scores`, for the report)."""
    scored = score_records(out_dir, splits["test"], threads=os.cpu_count(), shift={}, trust_remote_code=remote_code)
    shift = calibrate_model(out_dir, splits["val"], threads=os.cpu_count(), trust_remote_code=remote_code)
    with_shift = shifted(scored["positions"], scored["margin"], shift["offsets"])
    model, _ = load_model_dir(out_dir, trust_remote_code=remote_code)
    mlflow.log_metrics({f"test/{k}": v for k, v in scored["metrics"].items()})
    mlflow.log_metrics({f"test_shift/{k}": v for k, v in with_shift["metrics"].items()})
    mlflow.log_metric("params", count_parameters(model))
    return {"test": scored["metrics"], "test_shift": with_shift["metrics"], "shift": shift,
            "test_types": type_scores(splits["test"], scored["positions"], scored["prob"]),
            "test_shift_types": type_scores(splits["test"], scored["positions"], with_shift["prob"]),
            "params": count_parameters(model), "samples_per_s": scored["samples_per_s"],
            "test_units": {"task": [p["task"] for p in scored["positions"]],
                           "record_id": [p["record_id"] for p in scored["positions"]],
                           "target": [p["target"] for p in scored["positions"]], "margin": scored["margin"].tolist()}}
