"""One pipeline stage = one Ray Train run that turns an initial model dir into a trained one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train import RunConfig as TrainRunConfig

from orchestrator.config.schema import DataConfig as DataSection  # not ray.train's DataConfig, used below
from orchestrator.config.schema import (ConfigError, KDSettings, Placement, PretrainConfig, Resources, RunConfig,
                                 TCRDConfig, TeacherResources, TrainConfig)
from orchestrator.run.errors import StageError
from orchestrator.cluster.placement import scaling, torch_threads
from workers.contract import CacheSpec, StageJob, StageLossConfig, TeacherInputs, TeacherSpec, TrainSettings
from workers.training.entry_points import grounding_loop_per_worker, train_loop_per_worker
from workers.models.identity import PROMPT_FORMAT_VERSION, weights_hash
from workers.models.shapes import LevelShape
from workers.data.synth import SynthSpec

if TYPE_CHECKING:  # model code is imported where it is used: a sweep trial's process never needs it
    from transformers import ProcessorMixin


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
    config = {"train": pretrain.model_dump(), "spec": spec, "model_dir": str(init_dir), "out_dir": str(out_dir),
              "threads": torch_threads(res), "seed": seed, "tracking": tracking,
              "progress": str(progress) if progress else None}
    return _fit(grounding_loop_per_worker, name, config, res, storage, placement, datasets=None)


def _fit(loop, name: str, config: dict, res: Resources, storage: Path, placement: Placement | None,
         datasets: dict | None, callbacks: list | None = None) -> dict:
    from orchestrator.cluster.trainer import StageTrainer  # imports torch: only where a stage is fitted
    from orchestrator.cluster.warm_workers import prestart_train_workers, worker_runtime_env

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
    pairs = pairs or {t["stage"]: (False, None) for t in plan.teachers}
    teachers = tuple(TeacherSpec(stage=t["stage"], level=t["level"], pool=pool_names[t["stage"]],
                                 replicas=cfg.teachers.replicas, weight=t["weight"], temperature=t["temperature"],
                                 coupled=t["coupled"], label_words=pairs[t["stage"]][0], inputs=pairs[t["stage"]][1])
                     for t in plan.teachers)
    cache = (CacheSpec(cache_root, int(cfg.cache.max_gb * 2**30)) if cfg.cache.enabled and plan.teachers else None)
    return StageLossConfig(kind=plan.kind, ce_weight=plan.ce_weight, kd_loss=plan.kd.kd_loss, beta=plan.kd.beta,
                           k=cfg.teachers.k, prefetch=cfg.teachers.prefetch, call_retries=cfg.teachers.call_retries,
                           sharpness=plan.sharpness, teachers=teachers, cache=cache,
                           unlabeled_weight=plan.unlabeled_weight, unlabeled_use=cfg.data.unlabeled_use,
                           top_teacher=top_teacher(cfg, plan))


def top_teacher(cfg: RunConfig, plan: StagePlan) -> int:
    """The index of the stage's highest teacher: the first of its levels in `levels:` (largest first, as
    every shipped config lists them); its decision is the pseudo-label of `data.unlabeled_use: pseudo_labels`."""
    order = list(cfg.levels)
    return min(range(len(plan.teachers)), key=lambda i: order.index(plan.teachers[i]["level"]), default=0)


def uses_unlabeled(cfg: RunConfig, plan: StagePlan) -> bool:
    """Whether the stage trains on the unlabelled inputs too: distillation stages, when there are any."""
    return plan.kind in ("ppod", "tcrd") and cfg.data.has_unlabeled()


def default_stage_loss(teachers: list[dict] = (), **over) -> StageLossConfig:
    """A stage loss with the run config's defaults, for benches and tests that drive the workers without a run:
    `teachers` are dicts with at least `stage` and `pool` (otherwise one uncoupled teacher at T=1); `over` sets
    any other field. Kind `ppod` with teachers, `direct` without."""
    tr, tcrd = TeacherResources(), TCRDConfig()
    specs = tuple(TeacherSpec(**{"level": "T", "replicas": tr.replicas, "weight": 1.0, "temperature": 1.0,
                                 "coupled": False, "label_words": False, "inputs": None, **t}) for t in teachers)
    kd = KDSettings().model_dump(exclude={"kd_over"})  # kd_over is resolved per teacher (`TeacherSpec.label_words`)
    base = {"kind": "ppod" if specs else "direct", "ce_weight": 1.0, **kd, "k": tr.k, "prefetch": tr.prefetch,
            "call_retries": tr.call_retries, "sharpness": tcrd.sharpness, "teachers": specs, "cache": None,
            "unlabeled_weight": tcrd.unlabeled_weight, "unlabeled_use": DataSection().unlabeled_use, "top_teacher": 0}
    return StageLossConfig(**{**base, **over})


def loss_params(loss: StageLossConfig) -> dict:
    """The stage loss as MLflow params (teachers as a list, as the run config writes lists)."""
    return {**dataclasses.asdict(loss), "teachers": [dataclasses.asdict(t) for t in loss.teachers]}


DRIVER_ENCODE_RECORDS = 256  # a split this small is encoded in the driver (`encode_split`)


def encode_split(records: list[dict], processor: ProcessorMixin,
                 also: dict[str, ProcessorMixin] | None = None) -> ray.data.Dataset:
    """Prompts (one row per record), tokenization and image preprocessing as a Ray Data map, materialized once
    per run (every stage reuses it; the train workers never decode images), in record order so that runs
    repeat. `also`: other processors whose encodings the rows carry too, under their column prefixes.

    A split of at most DRIVER_ENCODE_RECORDS records is encoded here, in the driver, into the block the map
    would have made: the map's task would first start a Ray worker and import transformers, seconds of CPU on
    2 cores for milliseconds of work."""
    from ray.data.block import BlockAccessor

    from workers.models.prompts import encode_with, record_units

    units = record_units(records)
    if len(units) <= DRIVER_ENCODE_RECORDS:
        return ray.data.from_arrow(BlockAccessor.batch_to_block(encode_with(units, processor, also)))
    ds = ray.data.from_items(units).map_batches(
        encode_with, fn_kwargs={"processor": processor, "also": also}, batch_size=64, batch_format="numpy",
    )
    ds.context.execution_options.preserve_order = True  # blocks in record order, not task-completion order
    return ds.materialize()


def cache_root(cfg: RunConfig, run_dir: Path) -> str:
    """Where teacher outputs are cached: `cache.path`, else beside the run's models (shared by its sweeps)."""
    return cfg.cache.path or str(run_dir / "teacher_cache")


def augmented_epochs(cfg: RunConfig, plan: StagePlan, records: list[dict], processor: ProcessorMixin,
                     also: dict[str, ProcessorMixin] | None = None) -> list[ray.data.Dataset] | None:
    """Per-epoch augmented training data when `augment.enabled`, else None (the shared encoded set); encoded like
    the run's splits (`encode_split`'s `processor` and `also`)."""
    if not cfg.augment.enabled:
        return None
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


def stage_done(stage_file: Path, fingerprint: str) -> dict | None:
    """A finished stage leaves its result file (written last, atomically); None when not finished.
    A result from another config is refused rather than silently reused."""
    if not stage_file.is_file():
        return None
    done = json.loads(stage_file.read_text())
    if done.get("fingerprint") != fingerprint:
        raise ConfigError(f"{stage_file}: this stage was finished with a different config; use another "
                          "--run-dir (or delete the file to retrain it)")
    return done


def mark_done(stage_file: Path, result: dict) -> None:
    stage_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(stage_file)


def stage_tracking(uri: str) -> dict:
    """Tracking coordinates handed to rank 0 of the active (nested) MLflow run."""
    import mlflow  # here, not at import: the GPU bench drives stages on machines without MLflow

    return {"uri": uri, "run_id": mlflow.active_run().info.run_id}


@dataclass
class StagePlan:
    """One stage of a run: which level trains, from which model, against which teachers, with what loss."""

    name: str
    level: str
    kind: str  # grounding | direct | ppod | tcrd
    init: str | None  # stage whose model initialises the student; None: the level's initial model
    train: TrainConfig | PretrainConfig
    ce_weight: float = 1.0
    teachers: list[dict] = field(default_factory=list)  # {stage, level, weight, temperature, coupled}
    sharpness: float = 10.0
    kd: KDSettings = field(default_factory=KDSettings)  # the divergence of the KD terms
    unlabeled_weight: float = 0.0  # of the KD-only term over unlabelled inputs (distillation stages)


def plan_stages(cfg: RunConfig) -> list[StagePlan]:
    """(Grounding pre-training of tiny levels →) direct tuning → PPOD level by level → TCRD, each part
    switchable (how the ablation rows are made).

    A level's teacher model is its latest trained version: after its PPOD stage, the distilled one.
    """
    trained = cfg.direct.levels + ([st.student for st in cfg.ppod.stages] if cfg.ppod.enabled else [])
    ground = {lv: f"{lv}-grounding" for lv, lc in cfg.levels.items()
              if cfg.pretrain.enabled and not lc.path and lv in trained}
    plans = [StagePlan(name, lv, "grounding", None, cfg.pretrain) for lv, name in ground.items()]
    plans += [StagePlan(f"{lv}-direct", lv, "direct", ground.get(lv), cfg.train_for(lv)) for lv in cfg.direct.levels]
    latest = {p.level: p.name for p in plans if p.kind == "direct"}
    if cfg.ppod.enabled:
        for st in cfg.ppod.stages:
            teachers = [{"stage": _need(latest, t.level, "ppod"), "level": t.level, "weight": t.weight,
                         "temperature": cfg.ppod.temperature, "coupled": False} for t in st.teachers]
            plans.append(StagePlan(f"{st.student}+PPOD", st.student, "ppod", ground.get(st.student), cfg.ppod.train,
                                   cfg.ppod.ce_weight, teachers, kd=_kd(cfg.ppod),
                                   unlabeled_weight=cfg.ppod.unlabeled_weight))
            latest[st.student] = plans[-1].name
    if cfg.tcrd.enabled:
        tc = cfg.tcrd
        init = _need(latest, tc.student, "tcrd")
        base = init.removesuffix("-direct")
        teachers = [{"stage": _need(latest, lv, "tcrd"), "level": lv, "weight": w, "temperature": tc.temperature,
                     "coupled": tc.coupled} for lv, w in ((tc.top, tc.top_weight), (tc.assistant, tc.assistant_weight))]
        plans.append(StagePlan(f"{base}+TCRD", tc.student, "tcrd", init, tc.train, tc.ce_weight, teachers,
                               tc.sharpness, _kd(tc), tc.unlabeled_weight))
    return plans


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
        deps = ([out[p.init]] if p.init else []) + [out[t["stage"]] for t in p.teachers]
        # eval_every only adds validation scores to the record; the trained weights are the same
        train = p.train.model_dump(exclude={"eval_every"})
        if train.get("balance_tasks") is False:  # enters only when on: runs from before it keep their fingerprints
            del train["balance_tasks"]
        plan = {"name": p.name, "kind": p.kind, "train": train,
                "ce_weight": p.ce_weight, "teachers": p.teachers, "sharpness": p.sharpness}
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


def _kd(section: KDSettings) -> KDSettings:
    return KDSettings(**section.model_dump(include=set(KDSettings.model_fields)))


def _need(latest: dict[str, str], level: str, section: str) -> str:
    if level not in latest:
        raise ConfigError(f"{section} needs a trained {level!r}: list it under direct.levels or an earlier ppod stage")
    return latest[level]
