"""`hkd run`: data → pyramid → stages → report, recorded in MLflow, resumable stage by stage."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import ray
import ray.data
from transformers import ProcessorMixin

from orchestrator.config.schema import ConfigError, RunConfig
from orchestrator.report import console
from orchestrator.run.pairs import RunInputs
from orchestrator.cluster.placement import init_ray, local_resources
from orchestrator.cluster.machine import describe
from orchestrator.report.plots import render_plots
from orchestrator.report.progress import step_bar
from orchestrator.report.run_report import machine, markdown_table, mlflow_command, render_markdown, write_report
from orchestrator.run.stages import (StagePlan, augmented_epochs, cache_root, encode_split, fingerprints, fit_grounding,
                                 fit_stage,
                                 loss_params, mark_done, plan_stages, stage_done, stage_job, stage_loss,
                                 stage_tracking, train_datasets, uses_unlabeled)
from orchestrator.run.unlabeled import by_task, load_unlabeled, mixed, spread
from orchestrator.report.tracking import (check_reachable, driver_tag, end_stale_runs, flatten, log_params, mask_uri,
                                   masked, tracking_uri, using_store)
from orchestrator.cluster.warm_workers import prestart_train_workers, teacher_runtime_env
from workers.data import synth
from workers.data.records import DataError, load_jsonl, scan_file
from workers.inference.evaluate import calibrate_model, score_records, shifted
from workers.models.lengths import context_length, too_long
from workers.models.model_dirs import (LevelShape, ModelDirError, build_level,
                            check_model_dir, count_parameters, load_model_dir)
from workers.teachers.pool import TeacherPool
from workers.inference.type_scores import type_scores
from workers.models.vocab import fixed_tokenizer


@dataclass
class KeptTeachers:
    """Teacher pools handed from one run to the next in one driver (an ablation's variants), by the fingerprint
    of the stage they serve: the next run, if a teacher stage of its has the same fingerprint (the same trained
    model), uses the running pool instead of loading the model again. `keep`: the fingerprints the next run
    needs; a pool serving any other stops once its own run is done with it, and one the next run does not take
    stops as that run starts (no run holds more teachers than its own stages use)."""

    pools: dict[str, TeacherPool] = field(default_factory=dict)
    keep: set[str] = field(default_factory=set)

    def adopt(self, plans: list[StagePlan], prints: dict[str, str]) -> dict[str, TeacherPool]:
        """The kept pools that serve this run's teacher stages, by stage name; the others stop."""
        stages = {t["stage"] for p in plans for t in p.teachers}
        taken = {s: self.pools.pop(prints[s]) for s in sorted(stages) if prints[s] in self.pools}
        self.shutdown()
        return taken

    def release(self, pools: dict[str, TeacherPool], remaining: list[StagePlan], prints: dict[str, str]) -> None:
        """Take from `pools` those no `remaining` stage needs: kept when the next run needs them, else stopped
        (freeing their CPUs/GPUs)."""
        needed = {t["stage"] for p in remaining for t in p.teachers}
        for stage in [s for s in pools if s not in needed]:
            pool = pools.pop(stage)
            if prints[stage] in self.keep:
                self.pools[prints[stage]] = pool
            else:
                pool.shutdown()

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self.pools.clear()


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
    splits = load_splits(cfg, run_dir)
    unlabeled, meta_unlabeled = unlabeled_inputs(cfg, plans, run_dir, splits)
    init_dirs = init_levels(cfg, run_dir)
    inputs = RunInputs(cfg, plans, init_dirs, first=cfg.direct.levels[0])
    meta = _meta(cfg, plans, splits, uri, started, config_path, overrides) | {"unlabeled": meta_unlabeled}
    _print_plan(cfg, plans, meta, run_dir, inputs.kinds, log)
    check_prompt_lengths(cfg, run_dir, inputs, init_dirs, unlabeled)
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
                if plan.kind != "grounding":  # pre-training has no task metrics: not a report row
                    rows[plan.name] = result
                    for key, value in result["test"].items():
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
    _print_results(report, meta, run_dir, log)
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


def unlabeled_inputs(cfg: RunConfig, plans: list[StagePlan], run_dir: Path,
                     splits: dict[str, list[dict]]) -> tuple[list[dict], dict | None]:
    """The unlabelled records and their counts for run.json, when a stage trains on them; else ([], None)."""
    if not any(uses_unlabeled(cfg, p) for p in plans):
        return [], None
    return load_unlabeled(cfg, run_dir, splits, cfg.data.synth.generator_spec())


def encode_inputs(splits: dict[str, list[dict]], unlabeled: list[dict], processor: ProcessorMixin,
                  also: dict[str, ProcessorMixin] | None = None) -> dict[str, ray.data.Dataset]:
    """Encoded train and val splits, and `train_kd`: what distillation stages train on, the training records
    with the unlabelled ones spread among them (also added to `splits`; the train split itself without any).
    Training records are interleaved by task (each epoch then shuffles them, `workers.training.loop`), so no
    stretch of training sees one task alone. `also`: the other levels' processors by column prefix
    (`orchestrator.run.pairs`)."""
    splits["train"] = spread(by_task(splits["train"]))
    encoded = {s: encode_split(splits[s], processor, also) for s in ("train", "val")}
    splits["train_kd"] = mixed(splits["train"], spread(by_task(unlabeled)))
    encoded["train_kd"] = encode_split(splits["train_kd"], processor, also) if unlabeled else encoded["train"]
    return encoded


def _print_results(report: dict, meta: dict, run_dir: Path, log) -> None:
    """The table, and where the report, the plots, the logs and the MLflow UI are."""
    log("")
    log(markdown_table(report).rstrip())
    log("")
    log(f"report:  {run_dir / 'report.md'}  (print it again: hkd report {run_dir})")
    log(f"plots:   {run_dir / 'plots'}/")
    log(f"logs:    {run_dir / 'logs'}/")
    log(f"MLflow:  {mlflow_command(meta, run_dir)}   (parent run {meta['mlflow_run_id']})")
    speed = meta.get("machine", {}).get("probe")
    log(f"done in {meta['wall_s'] / 60:.1f} min" + (f" · {describe(speed)}" if speed else ""))


def _meta(cfg: RunConfig, plans: list[StagePlan], splits: dict, uri: str, started: float, config_path: str | None,
          overrides: list[str] | None) -> dict:
    """What ran, for run.json and the report (completed with the wall time and MLflow run at the end)."""
    return {"name": cfg.name, "config": config_path or "(in-process)", "overrides": overrides or [], "seed": cfg.seed,
            "data": data_counts(splits), "stages": [p.name for p in plans], "tracking_uri": mask_uri(uri),
            "experiment": cfg.tracking.experiment, "machine": machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}


def data_counts(splits: dict[str, list[dict]]) -> dict[str, dict]:
    """Records per split and task, for the plan line and the report."""
    return {split: {"records": len(recs), "tasks": dict(sorted(Counter(r["task"] for r in recs).items()))}
            for split, recs in splits.items()}


def _print_plan(cfg: RunConfig, plans: list[StagePlan], meta: dict, run_dir: Path, kinds: dict[str, str],
                log) -> None:
    """What the run will do, before it does it (`kinds`: each teacher→student pair's KD, `orchestrator.run.pairs`)."""
    log(f"hkd run {cfg.name}: {len(plans)} stages, seed {cfg.seed}")
    for name, lc in cfg.levels.items():
        if lc.path:
            log(f"  level {name}: {lc.path}")
        else:
            log(f"  level {name}: tiny {lc.family}, hidden {lc.hidden} × {lc.layers} layers, "
                f"vision {lc.vision_hidden} × {lc.vision_depth}")
    log("  data: " + "; ".join(f"{split} {n['records']} ("
                               + ", ".join(f"{t} {c}" for t, c in n["tasks"].items()) + ")"
                               for split, n in meta["data"].items()))
    if meta["unlabeled"]:
        log(f"  unlabelled (distillation stages): {meta['unlabeled']['records']} records; "
            f"{meta['unlabeled']['dropped_overlap']} generated ones dropped: their scene is in val or test")
    log("  stages: " + " → ".join(p.name for p in plans))
    across = [pair for pair, kind in kinds.items() if kind == "label_words"]
    if across:
        log("  KD over the label words (kd_over: label_words, or tokenizers that differ): " + ", ".join(across))
    log(f"  run dir: {run_dir}  (Ray and library output: {run_dir / 'logs'}/)")


def load_splits(cfg: RunConfig, run_dir: Path) -> dict[str, list[dict]]:
    """Records per split: generated into `<run dir>/data` (once) or read from the configured files."""
    return {split: [rec for path in paths for rec in load_jsonl(path, **_load_args(cfg))]
            for split, paths in split_files(cfg, run_dir).items()}


def split_files(cfg: RunConfig, run_dir: Path) -> dict[str, list]:
    """Data files per split, generating the benchmark into `<run dir>/data` first when it is the source."""
    if cfg.data.source == "synth":
        data_dir = run_dir / "data"
        if not (data_dir / "meta.json").is_file():
            s = cfg.data.synth
            synth.generate(data_dir, seed=cfg.seed, n_train=s.train, n_val=s.val, n_test=s.test, spec=s.generator_spec())
        return {split: [data_dir / task / f"{split}.jsonl" for task in synth.TASKS] for split in synth.SPLITS}
    files = {split: getattr(cfg.data.files, split) for split in ("train", "val", "test")}
    if not files["val"]:
        files["val"] = files["test"]
    return files


def _load_args(cfg: RunConfig) -> dict:
    return {"field_map": cfg.data.field_map or None, "require_labels": True, "default_task": cfg.data.default_task,
            **cfg.data.limits()}


def check_prompt_lengths(cfg: RunConfig, run_dir: Path, inputs: RunInputs, init_dirs: dict[str, Path],
                         unlabeled: list[dict]) -> None:
    """Refuse, before any training, a record whose prompt is longer than a level's context, counted with that
    level's processor (once per distinct processor, against the shortest context among its levels): every split
    and the unlabelled inputs the teachers answer for the cache (`workers.models.lengths`: no image is encoded)."""
    contexts = {level: n for level, d in init_dirs.items() if (n := context_length(d)) is not None}
    shortest: dict[str, str] = {}  # encoding key → its level with the shortest context
    for level in sorted(contexts, key=contexts.get):
        shortest.setdefault(inputs.levels[level].key, level)
    paths = dict.fromkeys([*(str(p) for paths in split_files(cfg, run_dir).values() for p in paths),
                           *(r["unlabeled_file"] for r in unlabeled)])
    for level in shortest.values():
        for path in paths:
            scan = scan_file(path, **{**_load_args(cfg), "require_labels": False}, first_error_only=True)
            for line, message in too_long(scan.records, scan.lines, inputs.levels[level].processor, contexts[level]):
                raise DataError(f"{path}:{line}: {message} (levels.{level})", path,
                                ("--model-dir", str(init_dirs[level])))


def init_levels(cfg: RunConfig, run_dir: Path) -> dict[str, Path]:
    """Initial model dir per level: a configured path, or a tiny random-init level built once, every tiny level
    with the one fixed tokenizer (`workers.models.vocab`)."""
    out, tokenizer = {}, None
    image_size = cfg.data.synth.image_size
    for level, lc in cfg.levels.items():
        if lc.path:
            try:
                check_model_dir(lc.path)
            except ModelDirError as err:
                raise ConfigError(f"levels.{level}.path: {err}") from None
            local = Path(lc.path)  # a local dir, relative to where hkd runs (workers run elsewhere), or a hub name
            out[level] = local.resolve() if local.exists() else local
            continue
        target = run_dir / "models" / "init" / level
        if not (target / "config.json").is_file():
            if tokenizer is None:
                tokenizer = fixed_tokenizer(cfg.vocab_size)
            shape = LevelShape(**lc.shape_fields())
            build_level(target, shape, tokenizer, image_size, seed=cfg.seed)
        out[level] = target
    return out


def _stage(cfg: RunConfig, run_dir: Path, plan: StagePlan, fingerprint: str, init_dirs: dict[str, Path],
           inputs: RunInputs, encoded: dict[str, ray.data.Dataset], splits: dict[str, list[dict]], uri: str,
           pools: dict, log, then: StagePlan | None = None) -> dict:
    """Train, test and record one stage, unless an earlier attempt already finished it; `then`: the next stage,
    whose new teacher replicas start (`orchestrator.cluster.warm_workers`) while this one is tested."""
    stage_file = run_dir / "stages" / f"{plan.name}.json"
    done = stage_done(stage_file, fingerprint)
    if done:
        log(f"[{plan.name}] already finished: skipped")
        return done
    out_dir = model_dir(run_dir, plan.name)
    init_dir = model_dir(run_dir, plan.init) if plan.init else init_dirs[plan.level]
    length = f"{plan.train.steps} steps" if plan.kind == "grounding" else f"{plan.train.epochs} epochs"
    log(f"[{plan.name}] training {plan.level} ({plan.kind}) for {length}")
    remote_code = cfg.levels[plan.level].trust_remote_code
    start = time.time()
    progress = run_dir / "ray" / f"{plan.name}.progress"
    with mlflow.start_run(run_name=plan.name, nested=True) as stage_run:
        mlflow.set_tags({"stage": plan.name, "level": plan.level, "kind": plan.kind})
        with step_bar(plan.name, progress):
            if plan.kind == "grounding":
                log_params(flatten({"stage": plan.train.model_dump()}))
                val = fit_grounding(plan.name, init_dir, out_dir, plan.train, cfg.data.synth.generator_spec(), cfg.resources,
                                    run_dir / "ray", cfg.seed, stage_tracking(uri), progress, cfg.placement)
            else:
                loss = stage_loss(cfg, plan, start_teachers(cfg, run_dir, plan, pools), cache_root(cfg, run_dir),
                                  inputs.stage_teachers(plan))
                log_params(flatten({"stage": plan.train.model_dump(), "loss": loss_params(loss)}))
                source = "train" if plan.kind == "direct" else "train_kd"  # only distillation sees unlabelled
                mlflow.log_metric("unlabeled_records", len(splits[source]) - len(splits["train"]))
                sets = train_datasets(encoded[source], augmented_epochs(cfg, plan, splits[source],
                                                                        inputs.processor, inputs.also))
                job = stage_job(cfg, plan, init_dir, out_dir, loss, sets, encoded[source].count(),
                                stage_tracking(uri), progress, inputs.prefixes[plan.level])
                val = fit_stage(plan.name, job, sets, encoded["val"], cfg.resources, run_dir / "ray", cfg.placement)
                mlflow.log_metrics({f"teacher_restarts_{t['stage'].replace('+', '_')}": pools[t["stage"]].restarts()
                                    for t in plan.teachers})
        if then is not None:
            prestart_train_workers(0, teachers=new_teacher_replicas(cfg, then, pools))
        result = {"level": plan.level, "kind": plan.kind, "fingerprint": fingerprint, "val": val,
                  "model_dir": str(out_dir), "mlflow_run_id": stage_run.info.run_id}
        if plan.kind != "grounding":  # pre-training has no task to test
            result.update(_test(out_dir, splits, remote_code))
        result["wall_s"] = time.time() - start
        mlflow.log_metric("wall_s", result["wall_s"])
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
    mark_done(stage_file, result)
    shown = result.get("test", val)
    log(f"[{plan.name}] done in {result['wall_s']:.0f} s · {'test' if 'test' in result else 'held-out'} "
        + ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if k.endswith(("f1", "accuracy", "loss"))))
    return result


def _test(out_dir: Path, splits: dict[str, list[dict]], remote_code: bool) -> dict:
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


def new_teacher_replicas(cfg: RunConfig, plan: StagePlan, pools: dict) -> int:
    """The teacher replicas `plan` will start: those of its teacher stages not already running in `pools`."""
    return cfg.teachers.replicas * sum(t["stage"] not in pools for t in plan.teachers)


def start_teachers(cfg: RunConfig, run_dir: Path, plan: StagePlan, pools: dict) -> dict[str, str]:
    """Start the stage's teacher pools not yet running (their pairing with the student was checked before any
    work, `orchestrator.run.pairs`); returns pool names by stage."""
    for t in plan.teachers:
        if t["stage"] not in pools:
            pools[t["stage"]] = TeacherPool.start(_pool_name(run_dir, t["stage"]), model_dir(run_dir, t["stage"]),
                                                 replicas=cfg.teachers.replicas,
                                                 num_cpus=cfg.teachers.num_cpus, num_gpus=cfg.teacher_gpus(t["level"]),
                                                 max_restarts=cfg.teachers.max_restarts,
                                                 resources=cfg.placement.teacher,
                                                 trust_remote_code=cfg.levels[t["level"]].trust_remote_code,
                                                 runtime_env=teacher_runtime_env())
    return {t["stage"]: pools[t["stage"]].name for t in plan.teachers}


def model_dir(run_dir: Path, stage: str) -> Path:
    """Direct tuning saves `models/<level>`; distilled students `models/<stage name>`."""
    return run_dir / "models" / stage.removesuffix("-direct")


def _pool_name(run_dir: Path, stage: str) -> str:
    """Actor names unique per run dir, so concurrent runs on one cluster never share a teacher."""
    return f"{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}-{stage}"
