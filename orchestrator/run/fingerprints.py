"""A stage's identity: its fingerprint (a hash of everything its result depends on) and the result file that
marks it finished, so a re-run skips it and an ablation shares it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from orchestrator.config.schema import ConfigError, KDSettings, RunConfig
from orchestrator.report.stage_result import StageResult
from orchestrator.run.kinds import StagePlan, uses_unlabeled
from workers.models.identity import PROMPT_FORMAT_VERSION, weights_hash
from workers.models.shapes import LevelShape


def stage_done(stage_file: Path, fingerprint: str) -> StageResult | None:
    """A finished stage leaves its result file (written last, atomically); None when not finished.
    A result from another config is refused rather than silently reused."""
    if not stage_file.is_file():
        return None
    done = json.loads(stage_file.read_text())
    if done.get("fingerprint") != fingerprint:
        raise ConfigError(f"{stage_file}: this stage was finished with a different config; use another "
                          "--run-dir (or delete the file to retrain it)")
    return StageResult.from_json(done)


def mark_done(stage_file: Path, result: StageResult) -> None:
    stage_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2))
    tmp.replace(stage_file)


def fingerprints(cfg: RunConfig, plans: list[StagePlan]) -> dict[str, str]:
    """Per stage, a hash of everything its result depends on: data, seed, vocabulary, its level, its own
    plan and, recursively, the stages it starts from or learns from. Equal fingerprints mean
    interchangeable results (a re-run skips them, an ablation shares them)."""
    # data.max_image_pixels and the size cap only decide which inputs are refused, never what an accepted run
    # computes; the unlabelled inputs enter only the stages that train on them (so the other stages' fingerprints
    # stay)
    run = cfg.model_dump(include={"seed", "vocab_size", "data", "augment", "pretrain"},
                         exclude={"data": {"max_image_pixels": True, "max_text_chars": True, "max_options": True,
                                           "unlabeled": True, "unlabeled_use": True, "synth": {"unlabeled"}}})
    run["k"], run["num_workers"] = cfg.teachers.k, cfg.resources.num_workers
    run["prompt_format"] = PROMPT_FORMAT_VERSION
    weights = {lv: weights_hash(lc.path) for lv, lc in cfg.levels.items() if lc.path and Path(lc.path).is_dir()}
    out: dict[str, str] = {}
    for p in plans:
        deps = ([out[p.init]] if p.init else []) + [out[t.stage] for t in p.teachers]
        # eval_every only adds validation scores to the record; the trained weights are the same
        train = p.train.model_dump(exclude={"eval_every"})
        if train.get("balance_tasks") is False:  # enters only when on: runs from before it keep their fingerprints
            del train["balance_tasks"]
        plan = {"name": p.name, "kind": p.kind.name, "train": train, "ce_weight": p.ce_weight,
                "teachers": [dataclasses.asdict(t) for t in p.teachers], "sharpness": p.sharpness}
        if p.kd != KDSettings():  # only a non-default divergence enters: runs from before `kd_loss` keep theirs
            plan["kd"] = p.kd.model_dump()
        if p.level in cfg.train_seeds:  # only a seed of its own enters: other stages keep their fingerprints
            plan["train_seed"] = cfg.train_seeds[p.level]
        if uses_unlabeled(cfg, p):
            plan["unlabeled"] = {"weight": p.unlabeled_weight, "files": cfg.data.unlabeled,
                                 "synth": cfg.data.synth.unlabeled, "use": cfg.data.unlabeled_use}
        level = cfg.levels[p.level].model_dump()
        if level["family"] == LevelShape.family:  # only another family enters: runs from before `family` keep theirs
            del level["family"]
        if p.level in weights:  # a local base: its weights, so a rebuilt base never reuses old stages
            level["weights"] = weights[p.level]
        blob = json.dumps({"run": run, "level": level, "plan": plan, "deps": deps},
                          sort_keys=True)
        out[p.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out
