"""Does the distilled S beat directly tuned S, over training seeds? Measured by `hkd run`'s own code, not a copy.

    python bench/claim.py --from-run runs/paper [--seeds 1,2]

Reruns the S stages of a finished run once per extra training seed (`train_seeds.<S>`: data order, augmentation
draws and torch's seed of S's stages; the run's `seed` alone makes the benchmark). The benchmark, the bases, L and
M stay the run's: their finished stages are linked into `<run>/claim/seed-<N>/`, not retrained
(`orchestrator.run.ablation.share_finished`), so every row is scored on the same test records. Prints per row and
task the mean ± sd over the run's seed and the extra ones, then the gain of the final S over directly tuned S:
each seed judged against its own S-direct (final mean of both tasks − that seed's S-direct mean), both rows
scored alike (both without the mapping shift; both with their own), with the paired bootstrap 95% interval of
the seed-mean gain (resampling test records, the same draws for every row; `orchestrator.report.stats`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.run.ablation import share_finished  # noqa: E402
from orchestrator.config.schema import RunConfig, validate_raw  # noqa: E402
from orchestrator.cluster.machine import describe, probe  # noqa: E402
from orchestrator.run.pipeline import run
from orchestrator.run.kinds import plan_stages
from orchestrator.report.stats import bootstrap_draws, percentile_interval  # noqa: E402
from orchestrator.report.tracking import tracking_uri  # noqa: E402
from workers.inference.calibration import sigmoid  # noqa: E402

TASKS = ("hallucination", "factuality")
SCORINGS = {"no shift": False, "each with its own shift": True}


def final_stage(cfg: RunConfig) -> tuple[str, str]:
    """The method's last stage (the final S) and its level."""
    last = plan_stages(cfg)[-1]
    return last.name, last.level


def seed_runs(run_dir: Path, seeds: list[int]) -> dict[int, Path]:
    """The run itself (its own training seed) and one run dir per extra seed, trained now where not finished."""
    cfg = validate_raw(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    _, level = final_stage(cfg)
    uri = tracking_uri(cfg.tracking.uri, run_dir.parent)
    dirs = {cfg.train_seed(level): run_dir}
    for seed in seeds:
        raw = {**cfg.model_dump(), "train_seeds": {**cfg.train_seeds, level: seed},
               "name": f"{cfg.name}-seed{seed}", "tracking": {**cfg.tracking.model_dump(), "uri": uri}}
        variant = RunConfig(**raw)
        target = run_dir / "claim" / f"seed-{seed}"
        shared = share_finished(run_dir, target, variant)
        print(f"[claim] training seed {seed}: {len(shared)} stage(s) shared with the run ({', '.join(shared)})",
              flush=True)
        run(variant, target)
        dirs[seed] = target
    return dirs


def stage_scores(run_dir: Path, stage: str, shifted: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per task: targets, record ids and P(positive) of a finished stage's test decisions."""
    result = json.loads((run_dir / "stages" / f"{stage}.json").read_text())
    units = result["test_units"]
    offsets = result["shift"]["offsets"] if shifted else {}
    task = np.asarray(units["task"])
    margin = np.asarray(units["margin"], dtype=float)
    out = {}
    for t in TASKS:
        keep = task == t
        out[t] = {"target": np.asarray(units["target"])[keep], "record": np.asarray(units["record_id"])[keep],
                  "score": sigmoid(margin[keep] + offsets.get(t, 0.0))}
    return out


def seed_mean_gain(runs: dict[int, Path], final: str, direct: str, shifted: bool) -> dict:
    """Per seed: the gain of `final` over that seed's `direct` on the mean of both tasks' macro-F1; their mean, and
    the paired bootstrap interval of the seed mean (each task's records resampled, every row on the same draws)."""
    scored = [stage_scores(d, s, shifted) for d in runs.values() for s in (final, direct)]
    values, draws = [], []
    for t in TASKS:
        rows = [row[t] for row in scored]
        v, dr = bootstrap_draws(rows[0]["target"], [r["score"] for r in rows], rows[0]["record"], "f1")
        values.append(v[0::2] - v[1::2])  # per seed: final − direct on this task
        draws.append(dr[0::2] - dr[1::2])
    per_seed = np.mean(values, axis=0)
    low, high = percentile_interval(np.mean(draws, axis=0).mean(axis=0))
    per_task = {t: float(np.mean(v)) for t, v in zip(TASKS, values)}
    return {"per_seed": per_seed.tolist(), "mean": float(per_seed.mean()), "interval": [low, high],
            "per_task": per_task}


def row_table(runs: dict[int, Path], rows: dict[str, Path | None], shifted: bool) -> list[str]:
    """Markdown rows: per row and task, mean ± sd of test macro-F1 over the seeds (L and M: the run's)."""
    lines = ["| row | " + " | ".join(TASKS) + " | mean of both |", "|---|---|---|---|"]
    for name, stage in rows.items():
        dirs = list(runs.values()) if name.startswith("S") else [runs[min(runs)]]
        f1 = np.array([[_f1(d, stage, t, shifted) for t in TASKS] for d in dirs])
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(f1.mean(0), f1.std(0, ddof=1) if len(dirs) > 1 else [0, 0])]
        mean = f1.mean(1)
        lines.append(f"| {name} ({len(dirs)} seed{'s' if len(dirs) > 1 else ''}) | " + " | ".join(cells)
                     + f" | {mean.mean():.3f} ± {mean.std(ddof=1) if len(dirs) > 1 else 0:.3f} |")
    return lines


def _f1(run_dir: Path, stage: str, task: str, shifted: bool) -> float:
    result = json.loads((run_dir / "stages" / f"{stage}.json").read_text())
    return result["test_shift" if shifted else "test"][f"{task}/f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-run", required=True, type=Path, help="a finished `hkd run` dir")
    ap.add_argument("--seeds", default="1,2", help="extra training seeds of the S stages")
    args = ap.parse_args()
    print(describe(probe()), flush=True)
    run_dir = args.from_run.resolve()
    runs = seed_runs(run_dir, [int(s) for s in args.seeds.split(",") if s])
    cfg = validate_raw(json.loads((run_dir / "config.json").read_text()), "config.json")
    final, level = final_stage(cfg)
    direct = f"{level}-direct"
    top = f"{cfg.direct.levels[0]}-direct"
    report = {}
    for scoring, shifted in SCORINGS.items():
        gain = seed_mean_gain(runs, final, direct, shifted)
        to_l = seed_mean_gain({0: run_dir}, final, top, shifted)
        report[scoring] = {"gain_over_direct": gain, "distance_to_L": to_l}
        print(f"\n## {scoring}\n")
        print("\n".join(row_table(runs, {top: top, direct: direct, final: final}, shifted)))
        print(f"\ngain of {final} over {direct} (mean of both tasks, per seed): "
              + ", ".join(f"{g:+.3f}" for g in gain["per_seed"])
              + f"; seed mean {gain['mean']:+.3f}, paired bootstrap 95% [{gain['interval'][0]:+.3f}, "
              f"{gain['interval'][1]:+.3f}]; per task " + ", ".join(f"{t} {v:+.3f}" for t, v in gain["per_task"].items()))
        print(f"{final} − {top} (the run's seed): {to_l['mean']:+.3f} [{to_l['interval'][0]:+.3f}, "
              f"{to_l['interval'][1]:+.3f}]")
    ablation = json.loads((run_dir / "report.json").read_text()).get("ablation", {})
    for name in ("hard pseudo-labels", "gold labels on all inputs"):
        if name in ablation:
            print(f"{name} (the run's seed, --ablation): " + json.dumps(ablation[name].get("test", ablation[name])))
    (run_dir / "claim").mkdir(exist_ok=True)
    (run_dir / "claim" / "claim.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
