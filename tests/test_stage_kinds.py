"""A stage kind is one registration (issue 31): a toy kind defined in this file alone, with its own config section,
plan and objective, is validated, planned, fingerprinted, found by a sweep and run by `hkd run`'s own pipeline.
Nothing else in the tree names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from orchestrator.config import schema
from orchestrator.config.schema import ConfigError, Strict, TrainConfig, validate_raw
from orchestrator.run import kinds
from orchestrator.run.fingerprints import fingerprints
from orchestrator.run.kinds import Planning, StageKind, StagePlan, plan_stages
from orchestrator.sweep.config import stage_plan
from workers.contract import Objective


class ReviewConfig(Strict):
    """The toy kind's section: the level re-tuned on the labels once more, from its latest stage."""

    enabled: bool = False
    level: str = "S"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, batch_size=8, lr=1e-4))


def _plan_review(p: Planning) -> None:
    review = getattr(p.cfg, "review", None)
    if review is None or not review.enabled:
        return
    init = p.need(review.level, "review")
    p.add(StagePlan(f"{init.removesuffix('-direct')}+review", review.level, kinds.KINDS["review"], init, review.train))


@pytest.fixture
def review_kind(monkeypatch) -> StageKind:
    """The toy kind, registered for this test only (the registries are restored afterwards)."""
    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))
    monkeypatch.setattr(schema, "_SECTIONS", dict(schema._SECTIONS))
    return kinds.register(StageKind("review", "review", _plan_review, Objective.CE, section_model=ReviewConfig))


def _raw(**review) -> dict:
    return {"name": "toy", "levels": {"S": {"path": "bases/tiny-qwen2_5_vl-84px/S"}},
            "data": {"synth": {"train": 12, "val": 6, "test": 6, "image_size": 84, "max_objects": 3}},
            "direct": {"levels": ["S"], "train": {"epochs": 1, "batch_size": 8}},
            "resources": {"dashboard": False}, "review": {"enabled": True, **review}}


def test_a_registered_kind_is_configured_planned_and_fingerprinted(review_kind):
    cfg = validate_raw(_raw(), "toy.yaml")
    plans = plan_stages(cfg)
    assert [(p.name, p.kind.name, p.init) for p in plans] == [("S-direct", "direct", None),
                                                              ("S+review", "review", "S-direct")]
    prints = fingerprints(cfg, plans)
    other_cfg = validate_raw(_raw(train={"lr": 3e-4}), "toy.yaml")
    other = fingerprints(other_cfg, plan_stages(other_cfg))  # its own settings enter its fingerprint, no other's
    assert other["S-direct"] == prints["S-direct"] and other["S+review"] != prints["S+review"]
    assert stage_plan(cfg, "review").name == "S+review"  # a sweep finds it by its kind's name
    with pytest.raises(ConfigError, match=r"toy.yaml: unknown key 'review.levl' \(did you mean 'level'\?\)"):
        validate_raw(_raw(levl="S"), "toy.yaml")


def test_without_the_registration_its_section_is_an_unknown_key():
    with pytest.raises(ConfigError, match="unknown key 'review'"):
        validate_raw(_raw(), "toy.yaml")


@pytest.mark.slow
def test_a_registered_kind_runs_through_the_pipeline(review_kind, tmp_path, monkeypatch):
    """`hkd run`'s pipeline trains, tests and reports the toy kind's stage like any other."""
    from orchestrator.cluster.placement import stop_ray
    from orchestrator.run.pipeline import run

    monkeypatch.chdir(Path(__file__).parent.parent)  # the base's path is relative to the checkout
    cfg = validate_raw(_raw(), "toy.yaml")
    run_dir = tmp_path / "runs" / "toy"
    try:
        report = run(cfg, run_dir, log=lambda line: None)
    finally:
        stop_ray()
    done = json.loads((run_dir / "stages" / "S+review.json").read_text())
    assert done["kind"] == "review" and (run_dir / "models" / "S+review" / "config.json").is_file()
    assert {"S-direct", "S+review"} <= set(report["rows"])
