"""Soak: a distillation pipeline under repeated real faults, against the same pipeline without them.

Runs the config once fault-free, then again while a background injector SIGKILLs, every `--every` logged
training steps, a teacher replica and a Ray Train worker in turn (a worker at most `resources.max_failures` times
per stage, the retries a stage has; a stage without teachers only loses workers). Injection stops after
`--minutes`; the run then finishes. Teachers may restart without limit here (`teachers.max_restarts: 1000`),
since every kill costs one restart. Prints the faults injected, the stages completed, and per stage the
final test macro-F1 and last training loss of both runs with their difference.

    python bench/soak.py [--every 6] [--minutes 10] [--epochs 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import ray

from orchestrator.cluster import faults
from orchestrator.config.schema import load_config
from orchestrator.cluster.machine import describe, probe
from orchestrator.run.teachers import _pool_name
from orchestrator.run.pipeline import run
from orchestrator.run.kinds import StagePlan, plan_stages

TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"
CONFIG = """
name: soak
vocab_size: 1024
data: {{source: synth, synth: {{train: 12, val: 6, test: 6}}}}
levels: {{L: {tiny}, M: {tiny}, S: {tiny}}}
direct: {{levels: [L], train: {{epochs: {epochs}, batch_size: 2, log_every: 1}}}}
ppod:
  enabled: {ppod}
  stages: [{{student: M, teachers: [{{level: L}}]}}, {{student: S, teachers: [{{level: M}}, {{level: L}}]}}]
  train: {{epochs: {epochs}, batch_size: 2, log_every: 1}}
teachers: {{k: 8, num_cpus: 0.5, prefetch: 1, max_restarts: 1000}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
"""


class Injector(threading.Thread):
    """Kills a teacher replica or a train worker of the running stage every `every` logged steps."""

    def __init__(self, run_dir: Path, plans: list[StagePlan], every: int, deadline: float, max_failures: int):
        super().__init__(daemon=True)
        self.run_dir, self.plans, self.every, self.deadline = run_dir, plans, every, deadline
        self.max_failures = max_failures
        self.uri = f"sqlite:///{run_dir.parent}/mlflow.db"
        self.events: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        next_kind, next_at = "teacher", collections.defaultdict(lambda: self.every)
        worker_kills: collections.Counter = collections.Counter()
        while not self.stop.is_set() and time.time() < self.deadline:
            plan, steps = self._running()
            if plan is None or steps[-1] < next_at[plan.name]:
                time.sleep(0.2)
                continue
            kinds = [next_kind, "worker" if next_kind == "teacher" else "teacher"]
            for kind in kinds:
                pid = self._inject(kind, plan, worker_kills)
                if pid:
                    self.events.append({"stage": plan.name, "kind": kind, "step": steps[-1], "pid": pid,
                                        "t": round(time.time(), 1)})
                    next_kind = "worker" if kind == "teacher" else "teacher"
                    break
            next_at[plan.name] = steps[-1] + self.every

    def _running(self) -> tuple[StagePlan | None, list[int]]:
        for plan in self.plans:
            if not (self.run_dir / "stages" / f"{plan.name}.json").exists():
                if not faults.stage_started(self.run_dir / "ray", plan.name):
                    return None, []
                steps = faults.logged_steps(self.uri, plan.name)
                return (plan, steps) if steps else (None, [])
        return None, []

    def _inject(self, kind: str, plan: StagePlan, worker_kills: collections.Counter) -> int | None:
        try:
            if kind == "teacher" and plan.teachers:
                return faults.kill_teacher(_pool_name(self.run_dir, plan.teachers[0]["stage"]))
            if kind == "worker" and worker_kills[plan.name] < self.max_failures:
                pid = faults.kill_train_worker()
                worker_kills[plan.name] += bool(pid)
                return pid
        except (ValueError, ray.exceptions.RayError):  # the actor is restarting or already gone
            return None
        return None


def final_metrics(run_dir: Path) -> dict[str, dict]:
    """Per finished stage: test macro-F1 (mean over tasks) and the last logged training loss."""
    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    out = {}
    for stage_file in sorted((run_dir / "stages").glob("*.json")):
        stage = json.loads(stage_file.read_text())
        runs = client.search_runs([client.get_experiment_by_name("hkd4vlm").experiment_id],
                                  f"attributes.run_name = '{stage_file.stem}' and attributes.status = 'FINISHED'")
        loss = max(client.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: (m.step, m.timestamp))
        resumed = [int(m.value) for m in client.get_metric_history(runs[0].info.run_id, "resumed_from_step")]
        out[stage_file.stem] = {"f1": stage["test"]["f1"], "last_loss": loss.value, "steps": stage["val"]["steps"],
                                "resumed_from": resumed}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=6, help="logged steps between faults")
    ap.add_argument("--minutes", type=float, default=10.0, help="stop injecting after this long")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", help="work dir (default: a temporary one)")
    ap.add_argument("--direct-only", action="store_true", help="L's direct stage alone, no PPOD (no teachers to kill; "
                                                               "the smoke test's size)")
    args = ap.parse_args()
    print(describe(probe()), flush=True)
    work = Path(args.out or tempfile.mkdtemp(prefix="hkd-soak-")).resolve()
    config = work / "soak.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(tiny=TINY, epochs=args.epochs, ppod="false" if args.direct_only else "true"))
    cfg = load_config(config)

    start = time.time()
    run(cfg, work / "clean" / "soak", log=lambda *_: None)
    clean_s = time.time() - start
    faulty_dir = work / "faulty" / "soak"
    injector = Injector(faulty_dir, plan_stages(cfg), args.every, time.time() + 60 * args.minutes,
                        cfg.resources.max_failures)
    injector.start()
    start = time.time()
    run(cfg, faulty_dir, log=lambda *_: None)
    faulty_s = time.time() - start
    injector.stop.set()
    ray.shutdown()

    clean, faulty = final_metrics(work / "clean" / "soak"), final_metrics(faulty_dir)
    kinds = collections.Counter(e["kind"] for e in injector.events)
    print(f"faults injected: {len(injector.events)} ({kinds['teacher']} teacher, {kinds['worker']} worker); "
          f"stages completed: {len(faulty)}/{len(clean)}; wall: fault-free {clean_s:.0f} s, with faults {faulty_s:.0f} s")
    worker_kills = collections.Counter(e["stage"] for e in injector.events if e["kind"] == "worker")
    for stage, got in faulty.items():  # each worker kill is one restart, and each restart logs where it started
        print(f"{stage:>10}: {worker_kills[stage]} worker kills, restarts recorded from steps {got['resumed_from']} "
              "(0: no registered checkpoint yet, from scratch)")
    for stage, want in clean.items():
        got = faulty.get(stage, {})
        print(f"{stage:>10}: test macro-F1 {want['f1']:.4f} vs {got.get('f1', float('nan')):.4f} "
              f"(diff {abs(want['f1'] - got.get('f1', float('nan'))):.2e}), last loss {want['last_loss']:.6f} vs "
              f"{got.get('last_loss', float('nan')):.6f} (diff {abs(want['last_loss'] - got.get('last_loss', float('nan'))):.2e})")
    print(json.dumps({"events": injector.events, "clean": clean, "faulty": faulty,
                      "wall_s": {"clean": clean_s, "faulty": faulty_s}}))


if __name__ == "__main__":
    main()
