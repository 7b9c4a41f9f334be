"""What does the teacher-output cache save a sweep? Two TCRD sweeps of N trials that differ only in loss weights
(CE against KD), cache off and on (starting empty), in one run: teacher forwards and wall time as ratios.

    python bench/sweep_cache.py [--base configs/quickstart.yaml] [--from-run RUN_DIR] [--trials 4]

Without --from-run, a stand-in run dir is built from the base config: its data, and its untrained levels in
place of the trained models the sweep reads (same shapes, so the same compute: the figures are about cost).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import ray
import yaml

from orchestrator.config.schema import load_config, read_raw
from orchestrator.cluster.machine import describe, probe
from orchestrator.run.levels import init_levels, model_dir
from orchestrator.run.kinds import plan_stages
from orchestrator.sweep.tune import run_sweep
from orchestrator.sweep.config import load_sweep, stage_plan

CE_WEIGHTS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def stand_in_run(base: Path, run_dir: Path) -> Path:
    """Data and initial levels of `base` under `run_dir`, each TCRD input model a copy of its level's init."""
    cfg = load_config(base)
    init = init_levels(cfg, run_dir)
    level_of = {p.name: p.level for p in plan_stages(cfg)}
    tcrd = stage_plan(cfg, "tcrd")
    for stage in [tcrd.init] + [t.stage for t in tcrd.teachers]:
        if not model_dir(run_dir, stage).exists():
            shutil.copytree(init[level_of[stage]], model_dir(run_dir, stage))
    return run_dir


def sweep_file(work: Path, base: Path, from_run: Path, trials: int, cache: bool) -> Path:
    """A sweep of `trials` CE weights, no early stopping; the cache (when on) starts empty under `work`."""
    raw = read_raw(base)
    raw["cache"] = {**raw.get("cache", {}), "path": str(work / "cache")}
    name = f"cache-{'on' if cache else 'off'}"
    (work / f"{name}-base.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    path = work / f"{name}.yaml"
    last_report = math.ceil(load_config(base).tcrd.train.epochs) + 1  # ASHA's first rung after every trial ends:
    path.write_text(yaml.safe_dump({                                   # all trials run fully, on and off alike
        "name": name, "base": str(work / f"{name}-base.yaml"), "from_run": str(from_run), "stage": "tcrd",
        "space": {"tcrd.ce_weight": {"grid": CE_WEIGHTS[:trials]}}, "cache": cache,
        "scheduler": {"grace_period": last_report}}))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", default="configs/quickstart.yaml")
    p.add_argument("--from-run", help="a finished `hkd run` of --base (default: a stand-in run dir)")
    p.add_argument("--trials", type=int, default=4, choices=range(1, len(CE_WEIGHTS) + 1),
                   help="1 saves nothing (the smoke test's size)")
    args = p.parse_args()
    print(describe(probe()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="sweep-cache-"))
    base = Path(args.base).resolve()
    from_run = Path(args.from_run).resolve() if args.from_run else stand_in_run(base, work / "runs" / "base")
    result = {}
    for cache in (True, False):  # the cache-on sweep first: its figures matter most
        summary = run_sweep(load_sweep(sweep_file(work, base, from_run, args.trials, cache)))
        result["on" if cache else "off"] = {"teacher_units": summary["teacher_units"], "wall_s": summary["wall_s"],
                                            "per_trial_units": [t["teacher_units"] for t in summary["trials"]]}
    ray.shutdown()
    on, off = result["on"], result["off"]
    one_trial = off["teacher_units"] / args.trials
    print(f"{args.trials} trials differing only in tcrd.ce_weight: teacher forwards (units) on {on['teacher_units']} "
          f"/ off {off['teacher_units']} = {on['teacher_units'] / off['teacher_units']:.3f}; "
          f"with the cache, forwards over the sweep = {on['teacher_units'] / one_trial:.2f} x one trial's; "
          f"wall time on {on['wall_s']:.0f} s / off {off['wall_s']:.0f} s = {on['wall_s'] / off['wall_s']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
