"""One pipeline stage = one Ray Train run that turns an initial model dir into a trained one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from orchestrator.config import ConfigError, Resources, RunConfig, TrainConfig
from orchestrator.errors import StageError
from orchestrator.placement import scaling, torch_threads
from workers.train_loop import train_loop_per_worker

MAX_FAILURES = 2  # worker-process failures a stage survives, each resuming from its latest checkpoint


def fit_stage(name: str, init_dir: Path, out_dir: Path, train_ds: ray.data.Dataset, val_ds: ray.data.Dataset,
              train: TrainConfig, loss: dict, res: Resources, storage: Path, seed: int,
              tracking: dict | None, trust_remote_code: bool = False) -> dict:
    """Run one stage's TorchTrainer; returns rank 0's final validation metrics. Resumes from the stage's
    own latest checkpoint when its storage already holds one (a re-run after a crash)."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model_dir": str(init_dir), "out_dir": str(out_dir), "train": train.model_dump(), "loss": loss,
            "n_units": train_ds.count(), "threads": torch_threads(res), "seed": seed, "tracking": tracking,
            "trust_remote_code": trust_remote_code,
        },
        scaling_config=scaling(res),
        run_config=TrainRunConfig(
            name=name, storage_path=str(storage.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_ordered()),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise StageError(f"stage {name} failed after {MAX_FAILURES} retries: {root_cause(err)}") from err
    if result.error:
        raise StageError(f"stage {name} failed: {root_cause(result.error)}") from result.error
    return result.return_value or {}


def _ordered():
    """Ray Train's ingest options with a fixed block order: every epoch, every run and a resumed attempt see
    the same batches (Ray Data's default order follows task completion), so a stage is reproducible and a
    resumed stage redoes exactly the steps it lost."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def root_cause(err: BaseException) -> str:
    """The last line of the innermost error: what a user needs (e.g. `OSError: [Errno 28] No space left on
    device: ...`), not Ray's wrapper tracebacks."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        err = failures[min(failures)]
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def stage_done(stage_file: Path) -> dict | None:
    """A finished stage leaves its result file (written last, atomically); None when not finished."""
    return json.loads(stage_file.read_text()) if stage_file.is_file() else None


def mark_done(stage_file: Path, result: dict) -> None:
    stage_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(stage_file)


def stage_tracking(uri: str) -> dict:
    """Tracking coordinates handed to rank 0 of the active (nested) MLflow run."""
    return {"uri": uri, "run_id": mlflow.active_run().info.run_id}


@dataclass
class StagePlan:
    """One stage of a run: which level trains, from which model, against which teachers, with what loss."""

    name: str
    level: str
    kind: str  # direct | ppod | tcrd
    init: str | None  # stage whose model initialises the student; None: the level's initial model
    train: TrainConfig
    ce_weight: float = 1.0
    teachers: list[dict] = field(default_factory=list)  # {stage, weight, temperature, coupled}
    sharpness: float = 10.0


def plan_stages(cfg: RunConfig) -> list[StagePlan]:
    """Direct tuning → PPOD level by level → TCRD, each part switchable (how the ablation rows are made).

    A level's teacher model is its latest trained version: after its PPOD stage, the distilled one.
    """
    plans = [StagePlan(f"{lv}-direct", lv, "direct", None, cfg.train_for(lv)) for lv in cfg.direct.levels]
    latest = {p.level: p.name for p in plans}
    if cfg.ppod.enabled:
        for st in cfg.ppod.stages:
            teachers = [{"stage": _need(latest, t.level, "ppod"), "level": t.level, "weight": t.weight,
                         "temperature": cfg.ppod.temperature, "coupled": False} for t in st.teachers]
            plans.append(StagePlan(f"{st.student}+PPOD", st.student, "ppod", None, cfg.ppod.train,
                                   cfg.ppod.ce_weight, teachers))
            latest[st.student] = plans[-1].name
    if cfg.tcrd.enabled:
        tc = cfg.tcrd
        init = _need(latest, tc.student, "tcrd")
        base = init.removesuffix("-direct")
        teachers = [{"stage": _need(latest, lv, "tcrd"), "level": lv, "weight": w, "temperature": tc.temperature,
                     "coupled": tc.coupled} for lv, w in ((tc.top, tc.top_weight), (tc.assistant, tc.assistant_weight))]
        plans.append(StagePlan(f"{base}+TCRD", tc.student, "tcrd", init, tc.train, tc.ce_weight, teachers,
                               tc.sharpness))
    return plans


def _need(latest: dict[str, str], level: str, section: str) -> str:
    if level not in latest:
        raise ConfigError(f"{section} needs a trained {level!r}: list it under direct.levels or an earlier ppod stage")
    return latest[level]
