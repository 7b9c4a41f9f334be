"""`hkd run`: data → pyramid → stages → report, recorded in MLflow, resumable stage by stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import ray.data

from orchestrator.cluster.placement import init_ray, local_resources
from orchestrator.cluster.warm_workers import prestart_train_workers
from orchestrator.config.schema import RunConfig
from orchestrator.report import console
from orchestrator.report.plots import render_plots
from orchestrator.report.progress import step_bar
from orchestrator.report.run_report import machine, render_markdown, write_report
from orchestrator.report.stage_result import StageResult
from orchestrator.report.summary import print_plan, print_results
from orchestrator.report.tracking import (
    check_reachable,
    driver_tag,
    end_stale_runs,
    flatten,
    log_params,
    mask_uri,
    masked,
    tracking_uri,
    using_store,
)
from orchestrator.run.evaluation import test_stage
from orchestrator.run.fingerprints import fingerprints, mark_done, stage_done
from orchestrator.run.inputs import (
    check_prompt_lengths,
    data_counts,
    encode_inputs,
    load_splits,
    unlabeled_inputs,
)
from orchestrator.run.kinds import StagePlan, plan_stages
from orchestrator.run.levels import init_levels, model_dir
from orchestrator.run.pairs import RunInputs
from orchestrator.run.stages import (
    StageData,
    StageTeachers,
    cache_root,
    fit_grounding,
    run_task_stage,
    stage_tracking,
)
from orchestrator.run.teachers import KeptTeachers, new_teacher_replicas, start_teachers


def run(cfg: RunConfig, run_dir: Path, log=console.say, config_path: str | None = None,
        overrides: list[str] | None = None, kept: KeptTeachers | None = None) -> dict:
    """Execute the whole run; finished stages (result file present) are skipped on a re-run.
    `log` gets hkd's own console lines: the plan, per stage a start and an end line, and where the results are.
    `kept`: teacher pools an earlier run of this driver left running for this one, and what to leave for later."""
    started = time.time()
    plans = plan_stages(cfg)
    prints = fingerprints(cfg, plans)
    run_dir = run_dir.resolve()
    # refuse a run dir finished under another config before doing any work
    pending = [p for p in plans if not stage_done(run_dir / "stages" / f"{p.name}.json", prints[p.name])]
    uri = tracking_uri(cfg.tracking.uri, run_dir.parent)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    check_reachable(uri)  # before anything of the run is written, not after an hour of training
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(masked(cfg.model_dump()), indent=2))
    scans: dict = {}  # every data file the run reads, parsed once, by path
    splits = load_splits(cfg, run_dir, scans)
    unlabeled, meta_unlabeled = unlabeled_inputs(cfg, plans, run_dir, splits, scans)
    init_dirs = init_levels(cfg, run_dir)
    inputs = RunInputs(cfg, plans, init_dirs, first=cfg.direct.levels[0])
    meta = _meta(cfg, plans, splits, uri, started, config_path, overrides) | {"unlabeled": meta_unlabeled}
    print_plan(cfg, [p.name for p in plans], meta, run_dir, inputs.kinds, log)
    check_prompt_lengths(scans, inputs, init_dirs)
    kept = kept or KeptTeachers()
    pools = kept.adopt(plans, prints)
    start_ray(cfg, run_dir, pending[0] if pending else None, pools, log)
    encoded = encode_inputs(splits, unlabeled, inputs.processor, inputs.also)
    rows = {}
    with using_store(uri, cfg.tracking.experiment):
        for run_id in end_stale_runs(run_dir, cfg.tracking.experiment):
            log(f"MLflow run {run_id} of an interrupted attempt marked KILLED")
    with using_store(uri, cfg.tracking.experiment), mlflow.start_run(run_name=cfg.name) as parent:
        mlflow.set_tags({"run_dir": str(run_dir), "driver": driver_tag()})
        log_params(flatten(cfg.model_dump()))
        try:
            for i, plan in enumerate(plans):
                log(f"stage {i + 1}/{len(plans)}: {plan.name}")
                result = _stage(cfg, run_dir, plan, prints[plan.name], init_dirs, inputs, encoded, splits, uri, pools,
                                log, then=plans[i + 1] if i + 1 < len(plans) else None)
                if plan.kind.task:  # grounding pre-training has no task metrics: not a report row
                    rows[plan.name] = result
                    for key, value in result.test.items():
                        mlflow.log_metric(f"{plan.name.replace('+', '_')}/{key}", value)  # '+' is not valid
                kept.release(pools, plans[i + 1:], prints)
        finally:
            kept.release(pools, [], prints)
        meta.update(mlflow_run_id=parent.info.run_id, wall_s=time.time() - started,
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
        report = write_report(run_dir, rows)
        plots = render_plots(run_dir, rows, report, uri)
        render_markdown(run_dir)  # again, now with the plots embedded
        mlflow.log_artifact(str(run_dir / "report.json"))
        mlflow.log_artifact(str(run_dir / "report.md"))
        for path in plots:
            mlflow.log_artifact(str(path), artifact_path="plots")
    print_results(report, meta, run_dir, log)
    return report


def start_ray(cfg: RunConfig, run_dir: Path, first: StagePlan | None, pools: dict, log) -> None:
    """Ray for the run (room for two teachers at once: TCRD's) and, when a stage is left to train (`first`),
    its processes and the teachers not already in `pools` (`orchestrator.cluster.warm_workers`), which import the model
    code while the data is encoded."""
    dashboard = init_ray(cfg.resources, teacher_cpus=2 * cfg.teachers.replicas * cfg.teachers.num_cpus,
                         custom=local_resources(cfg.placement, cfg.resources, cfg.teachers.replicas),
                         log_dir=run_dir / "logs")
    if dashboard:
        log(f"Ray dashboard: {dashboard}")
    if first is not None:
        prestart_train_workers(cfg.resources.num_workers, teachers=new_teacher_replicas(cfg, first, pools))


def _meta(cfg: RunConfig, plans: list[StagePlan], splits: dict, uri: str, started: float, config_path: str | None,
          overrides: list[str] | None) -> dict:
    """What ran, for run.json and the report (completed with the wall time and MLflow run at the end)."""
    return {"name": cfg.name, "config": config_path or "(in-process)", "overrides": overrides or [], "seed": cfg.seed,
            "data": data_counts(splits), "stages": [p.name for p in plans], "tracking_uri": mask_uri(uri),
            "experiment": cfg.tracking.experiment, "machine": machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}


def _stage(cfg: RunConfig, run_dir: Path, plan: StagePlan, fingerprint: str, init_dirs: dict[str, Path],
           inputs: RunInputs, encoded: dict[str, ray.data.Dataset], splits: dict[str, list[dict]], uri: str,
           pools: dict, log, then: StagePlan | None = None) -> StageResult:
    """Train, test and record one stage, unless an earlier attempt already finished it; `then`: the next stage,
    whose new teacher replicas start (`orchestrator.cluster.warm_workers`) while this one is tested."""
    stage_file = run_dir / "stages" / f"{plan.name}.json"
    done = stage_done(stage_file, fingerprint)
    if done:
        log(f"[{plan.name}] already finished: skipped")
        return done
    out_dir = model_dir(run_dir, plan.name)
    init_dir = model_dir(run_dir, plan.init) if plan.init else init_dirs[plan.level]
    length = f"{plan.train.epochs} epochs" if plan.kind.task else f"{plan.train.steps} steps"
    log(f"[{plan.name}] training {plan.level} ({plan.kind.name}) for {length}")
    start = time.time()
    progress = run_dir / "ray" / f"{plan.name}.progress"
    with mlflow.start_run(run_name=plan.name, nested=True) as stage_run:
        mlflow.set_tags({"stage": plan.name, "level": plan.level, "kind": plan.kind.name})
        with step_bar(plan.name, progress):
            if plan.kind.task:
                val = _train_task(cfg, run_dir, plan, init_dir, out_dir, inputs, encoded, splits, uri, pools, progress)
            else:
                log_params(flatten({"stage": plan.train.model_dump()}))
                val = fit_grounding(plan.name, init_dir, out_dir, plan.train, cfg.data.synth.generator_spec(),
                                    cfg.resources, run_dir / "ray", cfg.seed, stage_tracking(uri), progress,
                                    cfg.placement)
        if then is not None:
            prestart_train_workers(0, teachers=new_teacher_replicas(cfg, then, pools))
        tested = test_stage(out_dir, splits, cfg.levels[plan.level].trust_remote_code) if plan.kind.task else {}
        wall_s = time.time() - start
        result = StageResult(level=plan.level, kind=plan.kind.name, fingerprint=fingerprint, val=val,
                             model_dir=str(out_dir), mlflow_run_id=stage_run.info.run_id, wall_s=wall_s, **tested)
        mlflow.log_metric("wall_s", wall_s)
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
    mark_done(stage_file, result)
    shown = result.test or val
    log(f"[{plan.name}] done in {result.wall_s:.0f} s · {'test' if result.test else 'held-out'} "
        + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if k.endswith(("f1", "accuracy", "loss"))))
    return result


def _train_task(cfg: RunConfig, run_dir: Path, plan: StagePlan, init_dir: Path, out_dir: Path, inputs: RunInputs,
                encoded: dict[str, ray.data.Dataset], splits: dict[str, list[dict]], uri: str, pools: dict,
                progress: Path) -> dict:
    """One task stage in the active MLflow run, its teachers started first; only distillation stages see the
    unlabelled inputs (`train_kd`)."""
    source = "train_kd" if plan.kind.distills else "train"
    mlflow.log_metric("unlabeled_records", len(splits[source]) - len(splits["train"]))
    teachers = StageTeachers(start_teachers(cfg, run_dir, plan, pools), cache_root(cfg, run_dir),
                             inputs.stage_teachers(plan))
    data = StageData(encoded[source], encoded["val"], splits[source], lambda: (inputs.processor, inputs.also))
    val = run_task_stage(cfg, plan, init_dir, out_dir, data, teachers, run_dir / "ray", stage_tracking(uri),
                         record=lambda params: log_params(flatten(params)), progress=progress,
                         inputs=inputs.prefixes[plan.level])
    mlflow.log_metrics({f"teacher_restarts_{t.stage.replace('+', '_')}": pools[t.stage].restarts()
                        for t in plan.teachers})
    return val
