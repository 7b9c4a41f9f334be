"""Shared fixtures: a tiny benchmark and a tiny two-level pyramid, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from workers import synth  # noqa: E402
from workers.data import load_jsonl  # noqa: E402
from workers.models import LevelShape, build_level, build_tokenizer  # noqa: E402
from workers.prompts import record_units  # noqa: E402

TINY = LevelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_depth=1,
                  vision_heads=2)


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    synth.generate(out, seed=1, n_train=12, n_val=6, n_test=6)
    return out


@pytest.fixture(scope="session")
def records(bench_dir) -> list[dict]:
    return [r for t in synth.TASKS for r in load_jsonl(bench_dir / t / "train.jsonl")]


@pytest.fixture(scope="session")
def tokenizer(records):
    return build_tokenizer([u["text"] + u["answer"] for u in record_units(records)] + synth.sample_texts(50), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_level(tmp_path_factory.mktemp("models") / "tiny", TINY, tokenizer, image_size=112)


@pytest.fixture(autouse=True)
def _own_tracking_store(monkeypatch):
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which `hkd run` honours: no test may inherit
    another test's tracking store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)



def stage_loss_config(teachers: list[dict] = (), **over):
    """`orchestrator.stages.default_stage_loss` (the run config's defaults), for tests that drive the workers."""
    from orchestrator.stages import default_stage_loss

    return default_stage_loss(teachers, **over)
