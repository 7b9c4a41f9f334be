"""One pipeline stage = one Ray Train run that turns an initial model dir into a trained one."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train import RunConfig as TrainRunConfig

from orchestrator.cluster.placement import scaling, torch_threads
from orchestrator.config.schema import (
    DataConfig as DataSection,  # not ray.train's DataConfig, used below
)
from orchestrator.config.schema import (
    KDSettings,
    Placement,
    PretrainConfig,
    Resources,
    RunConfig,
    TCRDConfig,
    TeacherResources,
    TrainConfig,
)
from orchestrator.run.errors import StageError
from orchestrator.run.kinds import StagePlan
from workers.contract import (
    CacheSpec,
    GroundingJob,
    GroundingSettings,
    Objective,
    StageJob,
    StageLossConfig,
    TeacherInputs,
    TeacherSpec,
    TrainSettings,
)
from workers.data.synth import SynthSpec
from workers.training.entry_points import (
    grounding_loop_per_worker,
    train_loop_per_worker,
)

if TYPE_CHECKING:  # model code is imported where it is used: a sweep trial's process never needs it
    from transformers import ProcessorMixin


@dataclass(frozen=True)
class StageData:
    """What one task stage trains and validates on: the encoded training and validation sets, and the training
    records with their processors for augmented epochs (`processors()`: the student's and the others' by column
    prefix, called only when augmenting)."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    records: list[dict]
    processors: Callable[[], tuple[ProcessorMixin, dict[str, ProcessorMixin]]]


@dataclass(frozen=True)
class StageTeachers:
    """The running teachers a task stage calls: pool names by teacher stage, the cache's root, and per teacher
    stage whether it distils over the label words and its own inputs (None: all share the student's)."""

    pools: dict[str, str]
    cache_root: str
    pairs: dict[str, tuple[bool, TeacherInputs | None]] | None = None


def run_task_stage(cfg: RunConfig, plan: StagePlan, init_dir: Path, out_dir: Path, data: StageData,
                   teachers: StageTeachers, storage: Path, tracking: dict | None,
                   record: Callable[[dict], None] | None = None, name: str | None = None,
                   progress: Path | None = None, inputs: str = "", callbacks: list | None = None) -> dict:
    """Assemble one task stage (its loss, datasets and job) and train it: the one way `hkd run`, a sweep trial
    and the GPU bench run a stage. `record` gets the stage's settings and loss (MLflow params); `name`: the Ray
    Train run's (the plan's by default); `inputs`: the student's column prefix. Returns rank 0's final
    validation metrics."""
    loss = stage_loss(cfg, plan, teachers.pools, teachers.cache_root, teachers.pairs)
    if record is not None:
        record({"stage": plan.train.model_dump(), "loss": loss_params(loss)})
    epochs = augmented_epochs(cfg, plan, data.records, *data.processors()) if cfg.augment.enabled else None
    sets = train_datasets(data.train, epochs)
    job = stage_job(cfg, plan, init_dir, out_dir, loss, sets, data.train.count(), tracking, progress, inputs)
    return fit_stage(name or plan.name, job, sets, data.val, cfg.resources, storage, cfg.placement, callbacks)


def fit_stage(name: str, job: StageJob, train_sets: dict[str, ray.data.Dataset], val_ds: ray.data.Dataset,
              res: Resources, storage: Path, placement: Placement | None = None,
              callbacks: list | None = None) -> dict:
    """Run one task stage's TorchTrainer on `job` (`stage_job`); returns rank 0's final validation metrics.
    Resumes from the stage's own latest checkpoint when its storage already holds one (a re-run after a crash).

    `train_sets`: the training datasets by the names `job.train_sets` gives (`train_datasets`); `callbacks`:
    Ray Train callbacks (a sweep trial passes Tune's report callback)."""
    return _fit(train_loop_per_worker, name, {"job": job}, res, storage, placement,
                datasets={**train_sets, "val": val_ds}, callbacks=callbacks)


def train_datasets(train_ds: ray.data.Dataset, epoch_ds: list[ray.data.Dataset] | None) -> dict[str, ray.data.Dataset]:
    """The stage's training datasets by name: one per epoch when augmenting (`epoch_ds`), else `train_ds`."""
    return {f"train_{e}": ds for e, ds in enumerate(epoch_ds)} if epoch_ds else {"train": train_ds}


def stage_job(cfg: RunConfig, plan: StagePlan, init_dir: Path, out_dir: Path, loss: StageLossConfig,
              train_sets: dict[str, ray.data.Dataset], n_units: int, tracking: dict | None,
              progress: Path | None = None, inputs: str = "") -> StageJob:
    """The typed job of one task stage, built once from the validated config (workers add no defaults);
    `inputs`: the column prefix of the student's encoding ("": the run's first level's)."""
    return StageJob(model_dir=str(init_dir), out_dir=str(out_dir), train=train_settings(plan.train), loss=loss,
                    n_units=n_units, train_sets=tuple(train_sets), threads=torch_threads(cfg.resources),
                    seed=cfg.train_seed(plan.level), tracking=tracking, progress=str(progress) if progress else None,
                    trust_remote_code=cfg.levels[plan.level].trust_remote_code, inputs=inputs)


def train_settings(train: TrainConfig) -> TrainSettings:
    return TrainSettings(**train.model_dump())


def fit_grounding(name: str, init_dir: Path, out_dir: Path, pretrain: PretrainConfig, spec: SynthSpec,
                  res: Resources, storage: Path, seed: int, tracking: dict | None,
                  progress: Path | None = None, placement: Placement | None = None) -> dict:
    """Run one grounding pre-training stage (no dataset: scenes are generated per step)."""
    job = GroundingJob(model_dir=str(init_dir), out_dir=str(out_dir),
                       train=GroundingSettings(**pretrain.model_dump(exclude={"enabled"})), spec=spec,
                       threads=torch_threads(res), seed=seed, tracking=tracking,
                       progress=str(progress) if progress else None)
    return _fit(grounding_loop_per_worker, name, {"job": job}, res, storage, placement, datasets=None)


def _fit(loop, name: str, config: dict, res: Resources, storage: Path, placement: Placement | None,
         datasets: dict | None, callbacks: list | None = None) -> dict:
    from orchestrator.cluster.trainer import (
        StageTrainer,  # imports torch: only where a stage is fitted
    )
    from orchestrator.cluster.warm_workers import (
        prestart_train_workers,
        worker_runtime_env,
    )

    if datasets and res.num_workers == 1:  # handed to the one worker directly: no dataset manager actor
        config, datasets = {**config, "iterators": one_worker_iterators(datasets)}, None
    trainer = StageTrainer(
        loop,
        train_loop_config=config,
        scaling_config=scaling(res, placement),
        run_config=TrainRunConfig(
            name=name, storage_path=str(storage.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=res.max_failures), callbacks=callbacks,
            worker_runtime_env=worker_runtime_env(),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=_to_split(datasets),
                                  execution_options=_ordered()) if datasets else None,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise StageError(f"stage {name} failed after {res.max_failures} retries: {root_cause(err)}") from err
    if result.error:
        raise StageError(f"stage {name} failed: {root_cause(result.error)}") from result.error
    prestart_train_workers(res.num_workers)  # the next stage's, importing while the driver tests this one
    return result.return_value or {}


def stage_loss(cfg: RunConfig, plan: StagePlan, pool_names: dict[str, str], cache_root: str,
               pairs: dict[str, tuple[bool, TeacherInputs | None]] | None = None) -> StageLossConfig:
    """The stage's objective and teacher traffic (`workers.training.objectives`, `workers.teachers.requests`): weights,
    temperatures, divergence, teacher pools by name, the cache; `pairs`: per teacher stage, whether it distils
    over the label words and its own inputs (`orchestrator.run.pairs.RunInputs.stage_teachers`; None: every
    teacher shares the student's tokenizer and inputs)."""
    pairs = pairs or {t.stage: (False, None) for t in plan.teachers}
    teachers = tuple(TeacherSpec(stage=t.stage, level=t.level, pool=pool_names[t.stage],
                                 replicas=cfg.teachers.replicas, weight=t.weight, temperature=t.temperature,
                                 coupled=t.coupled, label_words=pairs[t.stage][0], inputs=pairs[t.stage][1])
                     for t in plan.teachers)
    cache = (CacheSpec(cache_root, int(cfg.cache.max_gb * 2**30)) if cfg.cache.enabled and plan.teachers else None)
    return StageLossConfig(objective=plan.kind.objective, ce_weight=plan.ce_weight, kd_loss=plan.kd.kd_loss, beta=plan.kd.beta,
                           k=cfg.teachers.k, prefetch=cfg.teachers.prefetch, call_retries=cfg.teachers.call_retries,
                           sharpness=plan.sharpness, teachers=teachers, cache=cache,
                           unlabeled_weight=plan.unlabeled_weight, unlabeled_use=cfg.data.unlabeled_use,
                           top_teacher=top_teacher(cfg, plan))


def top_teacher(cfg: RunConfig, plan: StagePlan) -> int:
    """The index of the stage's highest teacher: the first of its levels in `levels:` (largest first, as
    every shipped config lists them); its decision is the pseudo-label of `data.unlabeled_use: pseudo_labels`."""
    order = list(cfg.levels)
    return min(range(len(plan.teachers)), key=lambda i: order.index(plan.teachers[i].level), default=0)


def default_stage_loss(teachers: list[dict] = (), **over) -> StageLossConfig:
    """A stage loss with the run config's defaults, for benches and tests that drive the workers without a run:
    `teachers` are dicts with at least `stage` and `pool` (otherwise one uncoupled teacher at T=1); `over` sets
    any other field. Objective distillation with teachers, CE alone without."""
    tr, tcrd = TeacherResources(), TCRDConfig()
    specs = tuple(TeacherSpec(**{"level": "T", "replicas": tr.replicas, "weight": 1.0, "temperature": 1.0,
                                 "coupled": False, "label_words": False, "inputs": None, **t}) for t in teachers)
    kd = KDSettings().model_dump(exclude={"kd_over"})  # kd_over is resolved per teacher (`TeacherSpec.label_words`)
    base = {"objective": Objective.DISTILL if specs else Objective.CE, "ce_weight": 1.0, **kd, "k": tr.k, "prefetch": tr.prefetch,
            "call_retries": tr.call_retries, "sharpness": tcrd.sharpness, "teachers": specs, "cache": None,
            "unlabeled_weight": tcrd.unlabeled_weight, "unlabeled_use": DataSection().unlabeled_use, "top_teacher": 0}
    return StageLossConfig(**{**base, **over})


def loss_params(loss: StageLossConfig) -> dict:
    """The stage loss as MLflow params (teachers as a list, as the run config writes lists)."""
    return {**dataclasses.asdict(loss), "teachers": [dataclasses.asdict(t) for t in loss.teachers]}


def cache_root(cfg: RunConfig, run_dir: Path) -> str:
    """Where teacher outputs are cached: `cache.path`, else beside the run's models (shared by its sweeps)."""
    return cfg.cache.path or str(run_dir / "teacher_cache")


def augmented_epochs(cfg: RunConfig, plan: StagePlan, records: list[dict], processor: ProcessorMixin,
                     also: dict[str, ProcessorMixin] | None = None) -> list[ray.data.Dataset]:
    """Per-epoch augmented training data (`augment.enabled`); encoded like the run's splits (`encode_split`'s
    `processor` and `also`)."""
    from workers.training.epoch_data import epoch_datasets

    return epoch_datasets(records, processor, math.ceil(plan.train.epochs), cfg.train_seed(plan.level),
                          cfg.augment.transforms(), also)


def one_worker_iterators(datasets: dict[str, ray.data.Dataset]) -> dict[str, ray.data.DataIterator]:
    """A one-worker stage's datasets as the iterators Ray Train's dataset manager would give its worker (each
    read whole, in a fixed order), built here and passed in the loop's config: the manager is one more actor
    process per stage, started on the path to the first step."""
    config = DataConfig(datasets_to_split=[], execution_options=_ordered())
    (iterators,) = config.configure(datasets, world_size=1, worker_handles=None, worker_node_ids=None)
    return iterators


def _to_split(datasets: dict) -> list[str]:
    """The training sets, split across the workers (a stage with several; one worker reads its sets whole)."""
    return [k for k in datasets if k != "val"]


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


def stage_tracking(uri: str) -> dict:
    """Tracking coordinates handed to rank 0 of the active (nested) MLflow run."""
    import mlflow  # here, not at import: the GPU bench drives stages on machines without MLflow

    return {"uri": uri, "run_id": mlflow.active_run().info.run_id}
