"""How long after a stage's training function returns does `fit` return? Ray Train's controller sees the end
at its next poll of the workers, every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`: Ray's default 2 s against hkd's
(`orchestrator.cluster.trainer.POLL_INTERVAL_S`), alternated in one run on one local Ray, with a train function that
only sleeps (nothing else differs).

    python bench/stage_tail.py [--fits 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.backend import BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from orchestrator.cluster.machine import describe, probe
from orchestrator.cluster.placement import LOCAL_ONLY_ENV
from orchestrator.cluster.trainer import POLL_INTERVAL_ENV, POLL_INTERVAL_S


def loop(config: dict) -> None:
    time.sleep(1.0)
    Path(config["end"]).write_text(str(time.time()))


def tail(interval: str, work: Path, name: str) -> float:
    """Seconds from the train function's end to `fit` returning."""
    os.environ[POLL_INTERVAL_ENV] = interval  # Ray Train hands it to the controller it starts
    end = work / f"{name}.end"
    DataParallelTrainer(loop, train_loop_config={"end": str(end)}, backend_config=BackendConfig(),
                        scaling_config=ScalingConfig(num_workers=1),
                        run_config=RunConfig(name=name, storage_path=str(work))).fit()
    return time.time() - float(end.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fits", type=int, default=6, help="fits per interval, alternated")
    args = ap.parse_args()
    print(describe(probe()), flush=True)
    os.environ.update(LOCAL_ONLY_ENV)
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": LOCAL_ONLY_ENV})
    seen: dict[str, list[float]] = {"2.0": [], POLL_INTERVAL_S: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.fits):
            for interval in seen:
                seen[interval].append(tail(interval, Path(tmp), f"fit{i}_{interval}"))
    for interval, tails in seen.items():
        print(f"poll every {interval:>4} s: train function end → fit returned, mean {statistics.mean(tails):.2f} s, "
              f"median {statistics.median(tails):.2f} s ({len(tails)} fits)")
    print(f"mean tail, hkd / Ray default: {statistics.mean(seen[POLL_INTERVAL_S]) / statistics.mean(seen['2.0']):.2f}")


if __name__ == "__main__":
    main()
