"""The teachers' lifetime in a run: each teacher stage's actor pool starts when a stage first needs it, stops
when no remaining stage does, and may be kept for the next run of the same driver (an ablation's variants)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cluster.warm_workers import teacher_runtime_env
from orchestrator.config.schema import RunConfig
from orchestrator.run.kinds import StagePlan
from orchestrator.run.levels import model_dir
from workers.teachers.pool import TeacherPool


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
        stages = {t.stage for p in plans for t in p.teachers}
        taken = {s: self.pools.pop(prints[s]) for s in sorted(stages) if prints[s] in self.pools}
        self.shutdown()
        return taken

    def release(self, pools: dict[str, TeacherPool], remaining: list[StagePlan], prints: dict[str, str]) -> None:
        """Take from `pools` those no `remaining` stage needs: kept when the next run needs them, else stopped
        (freeing their CPUs/GPUs)."""
        needed = {t.stage for p in remaining for t in p.teachers}
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


def new_teacher_replicas(cfg: RunConfig, plan: StagePlan, pools: dict) -> int:
    """The teacher replicas `plan` will start: those of its teacher stages not already running in `pools`."""
    return cfg.teachers.replicas * sum(t.stage not in pools for t in plan.teachers)


def start_teachers(cfg: RunConfig, run_dir: Path, plan: StagePlan, pools: dict) -> dict[str, str]:
    """Start the stage's teacher pools not yet running (their pairing with the student was checked before any
    work, `orchestrator.run.pairs`); returns pool names by stage."""
    for t in plan.teachers:
        if t.stage not in pools:
            pools[t.stage] = TeacherPool.start(_pool_name(run_dir, t.stage), model_dir(run_dir, t.stage),
                                                 replicas=cfg.teachers.replicas,
                                                 num_cpus=cfg.teachers.num_cpus, num_gpus=cfg.teacher_gpus(t.level),
                                                 max_restarts=cfg.teachers.max_restarts,
                                                 resources=cfg.placement.teacher,
                                                 trust_remote_code=cfg.levels[t.level].trust_remote_code,
                                                 runtime_env=teacher_runtime_env())
    return {t.stage: pools[t.stage].name for t in plan.teachers}


def _pool_name(run_dir: Path, stage: str) -> str:
    """Actor names unique per run dir, so concurrent runs on one cluster never share a teacher."""
    return f"{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}-{stage}"
