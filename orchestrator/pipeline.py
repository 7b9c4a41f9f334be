"""`hkd run`: data → pyramid → stages → report, recorded in MLflow, resumable stage by stage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import ray
import ray.data

from orchestrator.config import RunConfig
from orchestrator.placement import init_ray
from orchestrator.report import write_report
from orchestrator.stages import fit_stage, mark_done, stage_done, stage_tracking
from orchestrator.tracking import check_reachable, flatten, log_params, tracking_uri
from workers import synth
from workers.data import load_jsonl
from workers.evaluate import score_records
from workers.models import (HKDProcessor, LevelShape, build_level, build_tokenizer, count_parameters,
                            load_model_dir)
from workers.prompts import encode_units, expand_units


def run(cfg: RunConfig, run_dir: Path, log=print) -> dict:
    """Execute the whole run; finished stages (result file present) are skipped on a re-run."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.uri, run_dir.parent)
    check_reachable(uri)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    splits = load_splits(cfg, run_dir)
    init_dirs = init_levels(cfg, run_dir, splits["train"])
    init_ray(cfg.resources)
    processor = HKDProcessor.from_pretrained(init_dirs[cfg.direct.levels[0]])
    encoded = {s: _encode(splits[s], processor) for s in ("train", "val")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    rows = {}
    with mlflow.start_run(run_name=cfg.name) as parent:
        mlflow.set_tag("run_dir", str(run_dir))
        log_params(flatten(cfg.model_dump()))
        for level in cfg.direct.levels:
            name = f"{level}-direct"
            rows[name] = _direct_stage(cfg, run_dir, level, name, init_dirs[level], encoded, splits["test"], uri, log)
            for key, value in rows[name]["test"].items():
                mlflow.log_metric(f"{name}/{key}", value)
        report = write_report(run_dir, rows)
        mlflow.log_artifact(str(run_dir / "report.json"))
        mlflow.log_artifact(str(run_dir / "report.md"))
        log(f"MLflow run {parent.info.run_id} at {uri}")
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
            out[level] = Path(lc.path)
            continue
        target = run_dir / "models" / "init" / level
        if not (target / "config.json").is_file():
            if tokenizer is None:
                tokenizer = build_tokenizer(_corpus(train_records), vocab_size=cfg.vocab_size)
            shape = LevelShape(**lc.model_dump(exclude={"path"}))
            build_level(target, shape, tokenizer, image_size, seed=cfg.seed)
        out[level] = target
    return out


def _corpus(records: list[dict]) -> list[str]:
    texts = [u["text"] for u in expand_units(records)]
    return texts + synth.sample_texts(2000)


def _encode(records: list[dict], processor: HKDProcessor) -> ray.data.Dataset:
    """Prompt expansion, tokenization and image preprocessing as a Ray Data map, materialized once per run
    (every stage reuses it; the train workers never decode images)."""
    units = expand_units(records)
    return ray.data.from_items(units).map_batches(
        encode_units, fn_kwargs={"processor": processor}, batch_size=64, batch_format="numpy",
    ).materialize()


def _direct_stage(cfg: RunConfig, run_dir: Path, level: str, name: str, init_dir: Path,
                  encoded: dict[str, ray.data.Dataset], test_records: list[dict], uri: str, log) -> dict:
    stage_file = run_dir / "stages" / f"{name}.json"
    done = stage_done(stage_file)
    if done:
        log(f"[{name}] already finished: skipped")
        return done
    out_dir = run_dir / "models" / level
    train = cfg.train_for(level)
    log(f"[{name}] training {level} for {train.epochs} epochs")
    start = time.time()
    with mlflow.start_run(run_name=name, nested=True):
        mlflow.set_tags({"stage": name, "level": level, "kind": "direct"})
        log_params(flatten({"stage": train.model_dump()}))
        val = fit_stage(name, init_dir, out_dir, encoded["train"], encoded["val"], train, cfg.resources,
                        run_dir / "ray", cfg.seed, stage_tracking(uri))
        scored = score_records(out_dir, test_records, threads=os.cpu_count())
        model, _ = load_model_dir(out_dir)
        result = {"level": level, "val": val, "test": scored["metrics"], "params": count_parameters(model),
                  "samples_per_s": scored["samples_per_s"], "wall_s": time.time() - start,
                  "model_dir": str(out_dir)}
        mlflow.log_metrics({f"test/{k}": v for k, v in scored["metrics"].items()})
        mlflow.log_metrics({"params": result["params"], "wall_s": result["wall_s"]})
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
    mark_done(stage_file, result)
    log(f"[{name}] test {json.dumps({k: round(v, 4) for k, v in scored['metrics'].items()})} "
        f"({result['wall_s']:.0f}s)")
    return result
