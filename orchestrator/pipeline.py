"""`hkd run`: data → pyramid → stages → report, recorded in MLflow, resumable stage by stage."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray.data

from orchestrator.config import ConfigError, RunConfig
from orchestrator.placement import init_ray
from orchestrator.report import write_report
from orchestrator.stages import StagePlan, fit_stage, mark_done, plan_stages, stage_done, stage_tracking
from orchestrator.tracking import (check_reachable, driver_tag, end_stale_runs, flatten, log_params, mask_uri,
                                   masked, tracking_uri, using_store)
from workers import synth
from workers.calibration import calibrate, store_shift
from workers.data import load_jsonl
from workers.evaluate import score_records, shifted
from workers.models import (HKDProcessor, LevelShape, ModelDirError, build_level, build_tokenizer,
                            check_model_dir, count_parameters, load_model_dir)
from workers.prompts import encode_units, expand_units
from workers.teacher import TeacherPool, check_compatible


def run(cfg: RunConfig, run_dir: Path, log=print) -> dict:
    """Execute the whole run; finished stages (result file present) are skipped on a re-run."""
    plans = plan_stages(cfg)
    run_dir = run_dir.resolve()
    uri = tracking_uri(cfg.tracking.uri, run_dir.parent)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    check_reachable(uri)  # before anything of the run is written, not after an hour of training
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(masked(cfg.model_dump()), indent=2))
    splits = load_splits(cfg, run_dir)
    init_dirs = init_levels(cfg, run_dir, splits["train"])
    check_tokenizers(plans, init_dirs)
    # TCRD runs two teachers at once: reserve room for both.
    init_ray(cfg.resources, teacher_cpus=2 * cfg.teachers.replicas * cfg.teachers.num_cpus)
    processor = HKDProcessor.from_pretrained(init_dirs[cfg.direct.levels[0]])
    encoded = {s: _encode(splits[s], processor) for s in ("train", "val")}
    rows, pools = {}, {}
    with using_store(uri, cfg.tracking.experiment):
        for run_id in end_stale_runs(run_dir, cfg.tracking.experiment):
            log(f"MLflow run {run_id} of an interrupted attempt marked KILLED")
    with using_store(uri, cfg.tracking.experiment), mlflow.start_run(run_name=cfg.name) as parent:
        mlflow.set_tags({"run_dir": str(run_dir), "driver": driver_tag()})
        log_params(flatten(cfg.model_dump()))
        try:
            for i, plan in enumerate(plans):
                rows[plan.name] = _stage(cfg, run_dir, plan, init_dirs, encoded, splits, uri, pools, log)
                for key, value in rows[plan.name]["test"].items():
                    mlflow.log_metric(f"{plan.name.replace('+', '_')}/{key}", value)  # '+' is not a valid key
                _release_pools(pools, plans[i + 1:])
        finally:
            _release_pools(pools, [])
        report = write_report(run_dir, rows)
        mlflow.log_artifact(str(run_dir / "report.json"))
        mlflow.log_artifact(str(run_dir / "report.md"))
        log(f"MLflow run {parent.info.run_id} at {mask_uri(uri)}")
    return report


def load_splits(cfg: RunConfig, run_dir: Path) -> dict[str, list[dict]]:
    """Records per split: generated into `<run dir>/data` (once) or read from the configured files."""
    if cfg.data.source == "synth":
        data_dir = run_dir / "data"
        if not (data_dir / "meta.json").is_file():
            s = cfg.data.synth
            spec = synth.SynthSpec(image_size=s.image_size, min_objects=s.min_objects, max_objects=s.max_objects,
                                   **{k: _tuples(v) for k, v in s.spec.items()})
            synth.generate(data_dir, seed=cfg.seed, n_train=s.train, n_val=s.val, n_test=s.test, spec=spec)
        files = {split: [data_dir / task / f"{split}.jsonl" for task in synth.TASKS] for split in synth.SPLITS}
    else:
        files = {split: getattr(cfg.data.files, split) for split in ("train", "val", "test")}
        if not files["val"]:
            files["val"] = files["test"]
    return {split: [rec for path in paths for rec in load_jsonl(path, cfg.data.field_map or None,
                                                                 require_labels=True,
                                                                 default_task=cfg.data.default_task)]
            for split, paths in files.items()}


def _tuples(value):
    """YAML lists → the tuples SynthSpec's frozen fields use."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def init_levels(cfg: RunConfig, run_dir: Path, train_records: list[dict]) -> dict[str, Path]:
    """Initial model dir per level: a configured path, or a tiny random-init level built once, all tiny
    levels sharing one tokenizer trained on the benchmark's texts."""
    out, tokenizer = {}, None
    image_size = cfg.data.synth.image_size
    for level, lc in cfg.levels.items():
        if lc.path:
            try:
                check_model_dir(lc.path)
            except ModelDirError as err:
                raise ConfigError(f"levels.{level}.path: {err}") from None
            out[level] = Path(lc.path)
            continue
        target = run_dir / "models" / "init" / level
        if not (target / "config.json").is_file():
            if tokenizer is None:
                tokenizer = build_tokenizer(_corpus(train_records), vocab_size=cfg.vocab_size)
            shape = LevelShape(**lc.model_dump(exclude={"path", "trust_remote_code"}))
            build_level(target, shape, tokenizer, image_size, seed=cfg.seed)
        out[level] = target
    return out


def check_tokenizers(plans: list[StagePlan], init_dirs: dict[str, Path]) -> None:
    """Refuse a teacher level whose tokenizer differs from its student's before any stage trains (a stage's
    model keeps its level's tokenizer, so the initial dirs decide)."""
    level_of = {p.name: p.level for p in plans}
    for teacher, student in sorted({(level_of[t["stage"]], p.level) for p in plans for t in p.teachers}):
        try:
            check_compatible(init_dirs[teacher], init_dirs[student])
        except ValueError as err:
            raise ConfigError(f"levels.{teacher} / levels.{student}: {err}") from None


def _corpus(records: list[dict]) -> list[str]:
    texts = [u["text"] for u in expand_units(records)]
    return texts + synth.sample_texts(2000)


def _encode(records: list[dict], processor: HKDProcessor) -> ray.data.Dataset:
    """Prompt expansion, tokenization and image preprocessing as a Ray Data map, materialized once per run
    (every stage reuses it; the train workers never decode images), in record order so that runs repeat."""
    units = expand_units(records)
    ds = ray.data.from_items(units).map_batches(
        encode_units, fn_kwargs={"processor": processor}, batch_size=64, batch_format="numpy",
    )
    ds.context.execution_options.preserve_order = True  # blocks in record order, not task-completion order
    return ds.materialize()


def _stage(cfg: RunConfig, run_dir: Path, plan: StagePlan, init_dirs: dict[str, Path],
           encoded: dict[str, ray.data.Dataset], splits: dict[str, list[dict]], uri: str, pools: dict, log) -> dict:
    """Train, test and record one stage, unless an earlier attempt already finished it."""
    stage_file = run_dir / "stages" / f"{plan.name}.json"
    done = stage_done(stage_file)
    if done:
        log(f"[{plan.name}] already finished: skipped")
        return done
    out_dir = model_dir(run_dir, plan.name)
    init_dir = model_dir(run_dir, plan.init) if plan.init else init_dirs[plan.level]
    loss = {"ce_weight": plan.ce_weight, "k": cfg.teachers.k, "prefetch": cfg.teachers.prefetch,
            "sharpness": plan.sharpness, "teachers": []}
    for t in plan.teachers:
        teacher_dir = model_dir(run_dir, t["stage"])
        pool_name = _pool_name(run_dir, t["stage"])
        if t["stage"] not in pools:
            pools[t["stage"]] = TeacherPool.start(pool_name, teacher_dir, replicas=cfg.teachers.replicas,
                                                 num_cpus=cfg.teachers.num_cpus, num_gpus=cfg.teachers.num_gpus,
                                                 max_restarts=cfg.teachers.max_restarts,
                                                 trust_remote_code=cfg.levels[t["level"]].trust_remote_code)
        loss["teachers"].append({**t, "name": pool_name, "replicas": cfg.teachers.replicas})
    log(f"[{plan.name}] training {plan.level} ({plan.kind}) for {plan.train.epochs} epochs")
    remote_code = cfg.levels[plan.level].trust_remote_code
    start = time.time()
    with mlflow.start_run(run_name=plan.name, nested=True):
        mlflow.set_tags({"stage": plan.name, "level": plan.level, "kind": plan.kind})
        log_params(flatten({"stage": plan.train.model_dump(), "loss": loss}))
        val = fit_stage(plan.name, init_dir, out_dir, encoded["train"], encoded["val"], plan.train, loss,
                        cfg.resources, run_dir / "ray", cfg.seed, stage_tracking(uri), remote_code)
        mlflow.log_metrics({f"teacher_restarts_{t['stage'].replace('+', '_')}": pools[t["stage"]].restarts()
                            for t in plan.teachers})
        scored = score_records(out_dir, splits["test"], threads=os.cpu_count(), shift={},
                               trust_remote_code=remote_code)
        shift = calibrate_model(out_dir, splits["val"], remote_code)
        with_shift = shifted(scored["units"], scored["margin"], shift["offsets"])
        model, _ = load_model_dir(out_dir, trust_remote_code=remote_code)
        result = {"level": plan.level, "kind": plan.kind, "val": val, "test": scored["metrics"],
                  "test_shift": with_shift["metrics"], "shift": shift, "params": count_parameters(model),
                  "samples_per_s": scored["samples_per_s"], "wall_s": time.time() - start,
                  "model_dir": str(out_dir)}
        mlflow.log_metrics({f"test/{k}": v for k, v in scored["metrics"].items()})
        mlflow.log_metrics({f"test_shift/{k}": v for k, v in with_shift["metrics"].items()})
        mlflow.log_metrics({"params": result["params"], "wall_s": result["wall_s"]})
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
    mark_done(stage_file, result)
    log(f"[{plan.name}] test {json.dumps({k: round(v, 4) for k, v in scored['metrics'].items()})} "
        f"({result['wall_s']:.0f}s)")
    return result


def calibrate_model(model_dir: Path, val_records: list[dict], trust_remote_code: bool = False) -> dict:
    """Mapping shift: per-task offset on the label-word margin that maximises validation macro-F1,
    stored in the model dir (used by `hkd evaluate` and `hkd predict`)."""
    scored = score_records(model_dir, val_records, threads=os.cpu_count(), shift={},
                           trust_remote_code=trust_remote_code)
    tasks = np.array([u["task"] for u in scored["units"]])
    targets = np.array([u["target"] for u in scored["units"]])
    per_task = {task: calibrate(scored["margin"][tasks == task], targets[tasks == task]) for task in sorted(set(tasks))}
    offsets = {task: c["offset"] for task, c in per_task.items()}
    store_shift(model_dir, offsets)
    return {"offsets": offsets, "val": per_task}


def model_dir(run_dir: Path, stage: str) -> Path:
    """Direct tuning saves `models/<level>`; distilled students `models/<stage name>`."""
    return run_dir / "models" / stage.removesuffix("-direct")


def _pool_name(run_dir: Path, stage: str) -> str:
    """Actor names unique per run dir, so concurrent runs on one cluster never share a teacher."""
    return f"{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}-{stage}"


def _release_pools(pools: dict, remaining: list[StagePlan]) -> None:
    """Stop teacher actors that no later stage needs, freeing their CPUs/GPUs."""
    needed = {t["stage"] for p in remaining for t in p.teachers}
    for stage in list(pools):
        if stage not in needed:
            pools.pop(stage).shutdown()
