"""`hkd sweep`: re-train one stage of a finished run under Ray Tune, trials sharing teachers and their cache.

The teachers (the run's trained models) load once, as named actor pools the sweep driver owns, and serve every
trial; with the teacher-output cache, trials that differ only in loss weights or learning rate compute no
teacher forward after the first fill. Each trial is a function trainable that builds and fits the stage's
TorchTrainer (the Ray 2.60 pattern) with Tune's report callback, so ASHA sees validation macro-F1 every
epoch. MLflow: a parent run per sweep, a child per trial (tagged `best` for the winner).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.data
import yaml
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from orchestrator.cluster.orphans import OrphanReaper
from orchestrator.cluster.placement import init_ray
from orchestrator.cluster.warm_workers import prestart_train_workers
from orchestrator.config.schema import ConfigError, RunConfig
from orchestrator.report.tracking import (
    check_reachable,
    flatten,
    log_params,
    tracking_uri,
    using_store,
)
from orchestrator.run.levels import initial_dir, model_dir
from orchestrator.run.stages import StageData, StageTeachers, cache_root, run_task_stage
from orchestrator.sweep.config import METRIC, MODE, Sweep

TRIAL_DRIVER_CPUS = 1  # a trial's own process; Tune cannot schedule it with 0 (STACK-NOTES)


@dataclass
class TrialContext:
    """What every trial needs besides its drawn values (shipped once through the object store)."""

    sweep: Sweep
    init_dir: Path
    out_dir: Path
    teachers: StageTeachers
    records: list[dict]
    uri: str
    experiment_id: str
    parent_id: str
    also_dirs: dict[str, Path]  # the teachers' other encodings: column prefix → a model dir with that processor


def run_sweep(sweep: Sweep, log=print) -> dict:
    """Run the sweep; returns the best trial, per-trial results and the teachers' forwards over the sweep.

    The pipeline and model code are imported here, in the sweep's driver: each trial's process imports this
    module to run `_trial` and needs neither."""
    from orchestrator.run.inputs import encode_inputs, load_splits, unlabeled_inputs
    from orchestrator.run.pairs import RunInputs
    from orchestrator.run.teachers import start_teachers

    spec, cfg, plan = sweep.spec, sweep.base, sweep.plan
    from_run = Path(spec.from_run).resolve()
    levels = trial_levels(sweep, from_run)
    init_dir = levels[plan.level]
    out_dir = from_run / "sweeps" / spec.name
    uri = tracking_uri(cfg.tracking.uri, from_run.parent)
    check_reachable(uri)
    splits = load_splits(cfg, from_run)
    unlabeled, _ = unlabeled_inputs(cfg, [plan], from_run, splits)
    teacher_cpus = len(plan.teachers) * cfg.teachers.replicas * cfg.teachers.num_cpus
    init_ray(cfg.resources, teacher_cpus=teacher_cpus + TRIAL_DRIVER_CPUS)
    # the first trial's worker and the teachers: while the data is encoded
    prestart_train_workers(cfg.resources.num_workers, teachers=cfg.teachers.replicas * len(plan.teachers))
    inputs = RunInputs(cfg, [plan], levels, first=plan.level)
    encoded = encode_inputs(splits, unlabeled, inputs.processor, inputs.also)
    source = "train_kd" if plan.kind.distills else "train"  # as in `hkd run`: only distillation sees unlabelled
    train_ds, val_ds = encoded[source], encoded["val"]
    pools: dict = {}
    start = time.time()
    with using_store(uri, cfg.tracking.experiment), mlflow.start_run(run_name=f"sweep-{spec.name}") as parent:
        mlflow.set_tags({"sweep": spec.name, "stage": plan.name, "from_run": str(from_run)})
        log_params(flatten({"sweep": spec.model_dump(exclude={"space"}),
                            "space": {k: d.model_dump(exclude_none=True) for k, d in spec.space.items()}}))
        try:
            teachers = StageTeachers(start_teachers(cfg, from_run, plan, pools), cache_root(cfg, from_run),
                                     inputs.stage_teachers(plan))
            ctx = TrialContext(sweep, init_dir, out_dir, teachers, splits[source], uri, parent.info.experiment_id,
                               parent.info.run_id, {inputs.prefixes[lv]: d for lv, d in levels.items()
                                                    if inputs.prefixes[lv]})
            results = _tuner(sweep, ctx, train_ds, val_ds, teacher_cpus).fit()
            teacher_units = sum(i["served_units"] for pool in pools.values() for i in pool.info())
        finally:
            for pool in pools.values():
                pool.shutdown()
        summary = _summarize(sweep, results, ctx, teacher_units, time.time() - start)
        mlflow.log_metrics({"best_f1": summary["best"]["f1"], "teacher_units": teacher_units,
                            "wall_s": summary["wall_s"]})
        mlflow.set_tag("best_trial", summary["best"]["trial_id"])
    log(f"best trial {summary['best']['trial_id']}: val f1 {summary['best']['f1']:.4f} with "
        f"{summary['best']['values']}; ready-to-run config: {summary['best_yaml']}")
    return summary


def trial_levels(sweep: Sweep, from_run: Path) -> dict[str, Path]:
    """The models a sweep's stage needs from its finished run, by level: the student's start (its `init` stage's
    model, or the level's initial model: a configured `path`, or the tiny level the run built) and its teachers'
    trained models. Refuses a missing one before any work."""
    cfg, plan = sweep.base, sweep.plan
    start = model_dir(from_run, plan.init) if plan.init else initial_dir(cfg, from_run, plan.level)
    levels = {plan.level: start} | {t.level: model_dir(from_run, t.stage) for t in plan.teachers}
    from_path = not plan.init and cfg.levels[plan.level].path  # the student starts from its configured path
    for level, needed in levels.items():
        if not (from_path and level == plan.level) and not (needed / "config.json").is_file():
            raise ConfigError(f"{sweep.spec.from_run} has no trained model {needed.name!r}: run "
                              f"`hkd run {sweep.spec.base} --run-dir {sweep.spec.from_run}` first")
    return levels


def max_concurrent(cfg: RunConfig, teacher_cpus: float) -> int:
    """Trials that fit at once beside the teachers and one CPU kept for Ray Data (never fewer than one)."""
    res = ray.cluster_resources()
    per_trial = TRIAL_DRIVER_CPUS + cfg.resources.num_workers * cfg.resources.cpus_per_worker
    fit = (res.get("CPU", 0) - teacher_cpus - 1) // per_trial
    if cfg.resources.use_gpu:
        gpus = res.get("GPU", 0) - cfg.teachers.num_gpus * cfg.teachers.replicas
        fit = min(fit, gpus // (cfg.resources.num_workers * cfg.resources.gpus_per_worker))
    return max(1, int(fit))


def _tuner(sweep: Sweep, ctx: TrialContext, train_ds: ray.data.Dataset, val_ds: ray.data.Dataset,
           teacher_cpus: float) -> tune.Tuner:
    spec = sweep.spec
    max_epochs = max(math.ceil(sweep.trial_config(v)[1].train.epochs) for v in _epoch_extremes(sweep))
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx, train_ds=train_ds, val_ds=val_ds),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    # One report per epoch, then the trial's returned dict: max_t past the last epoch never stops a trial
    # between its last epoch and saving its model.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs + 1,
                              grace_period=spec.scheduler.grace_period,
                              reduction_factor=spec.scheduler.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={key: dist.tune() for key, dist in spec.space.items()},
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent_trials
                                    or max_concurrent(sweep.base, teacher_cpus)),
        run_config=tune.RunConfig(name="tune", storage_path=str(ctx.out_dir), verbose=0,
                                  callbacks=[OrphanReaper()]),  # frees what trials ASHA stopped still hold
    )


def _epoch_extremes(sweep: Sweep) -> list[dict]:
    """Value sets covering every epoch count a trial can draw (ASHA's max_t)."""
    key = f"{sweep.plan.kind.section}.train.epochs"
    dist = sweep.spec.space.get(key)
    return [{key: v} for v in dist.values_to_check()] if dist else [{}]


def _trial(values: dict, ctx: TrialContext, train_ds: ray.data.Dataset, val_ds: ray.data.Dataset) -> dict:
    """One trial: the stage under the drawn values (`run_task_stage`), recorded as a child MLflow run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg, plan = ctx.sweep.trial_config(values)
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(ctx.uri)
    run_id = client.create_run(ctx.experiment_id, run_name=f"trial-{trial_id}", tags={
        "mlflow.parentRunId": ctx.parent_id, "trial_id": trial_id, "stage": plan.name}).info.run_id
    data = StageData(train_ds, val_ds, ctx.records, lambda: _processors(ctx))
    try:
        result = run_task_stage(cfg, plan, ctx.init_dir, ctx.out_dir / "trials" / trial_id, data, ctx.teachers,
                                ctx.out_dir / "train", {"uri": ctx.uri, "run_id": run_id},
                                record=lambda params: log_params(flatten({"space": values, **params}), client, run_id),
                                name=f"{plan.name}-{trial_id}", callbacks=[TuneReportCallback()])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"final/{k}", float(v), now, 0)
                                      for k, v in result.items() if isinstance(v, (int, float))])
    client.set_terminated(run_id, "FINISHED")
    return result


def _processors(ctx: TrialContext) -> tuple:
    """The trial's processors for augmented epochs, as the sweep encoded its splits (loaded only when augmenting)."""
    from workers.models.families import load_processor

    return load_processor(ctx.init_dir), {prefix: load_processor(d) for prefix, d in ctx.also_dirs.items()}


def _summarize(sweep: Sweep, results: tune.ResultGrid, ctx: TrialContext, teacher_units: int,
               wall_s: float) -> dict:
    """Close trial runs ASHA stopped, tag the best, write best.yaml; the sweep's result as a dict."""
    client = MlflowClient(ctx.uri)
    children = client.search_runs([ctx.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_id}'")
    by_trial = {r.data.tags.get("trial_id"): r for r in children}
    for run in children:
        if run.info.status == "RUNNING":  # its process was stopped by the scheduler
            client.set_tag(run.info.run_id, "stopped_early", "true")
            client.set_terminated(run.info.run_id, "KILLED")
    trials = [{"trial_id": r.metrics.get("trial_id"), "values": r.config, "f1": r.metrics.get(METRIC),
               "error": repr(r.error) if r.error else None, "teacher_units": r.metrics.get("teacher/units"),
               "cache_hits": r.metrics.get("cache/hits")} for r in results]
    best = results.get_best_result(METRIC, MODE)
    best_row = next(t for t in trials if t["trial_id"] == best.metrics["trial_id"])
    client.set_tag(by_trial[best_row["trial_id"]].info.run_id, "best", "true")
    raw = sweep.trial_raw(best.config)
    raw["name"] = f"{sweep.base.name}-{sweep.spec.name}-best"
    best_yaml = ctx.out_dir / "best.yaml"
    best_yaml.parent.mkdir(parents=True, exist_ok=True)
    best_yaml.write_text(f"# best trial {best_row['trial_id']} of sweep {sweep.spec.name}: val f1 {best_row['f1']}\n"
                         + yaml.safe_dump(raw, sort_keys=False))
    return {"best": best_row, "best_yaml": str(best_yaml), "trials": trials, "teacher_units": teacher_units,
            "wall_s": wall_s}
