"""What `hkd run` prints before and after the work: the plan (levels, data, stages, KD across tokenizers) and the
results (the table, and where the report, plots, logs and MLflow runs are)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.cluster.machine import describe
from orchestrator.config.schema import RunConfig
from orchestrator.report.run_report import markdown_table, mlflow_command


def print_results(report: dict, meta: dict, run_dir: Path, log) -> None:
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


def print_plan(cfg: RunConfig, stages: list[str], meta: dict, run_dir: Path, kinds: dict[str, str], log) -> None:
    """What the run will do, before it does it (`kinds`: each teacher→student pair's KD, `orchestrator.run.pairs`)."""
    log(f"hkd run {cfg.name}: {len(stages)} stages, seed {cfg.seed}")
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
    log("  stages: " + " → ".join(stages))
    across = [pair for pair, kind in kinds.items() if kind == "label_words"]
    if across:
        log("  KD over the label words (kd_over: label_words, or tokenizers that differ): " + ", ".join(across))
    log(f"  run dir: {run_dir}  (Ray and library output: {run_dir / 'logs'}/)")
