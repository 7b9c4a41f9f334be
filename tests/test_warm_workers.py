"""Warm stage processes (`orchestrator.cluster.warm_workers`): on hkd's private Ray, a stage's worker is a process started
before the stage, its model code already imported; each stage's fit leaves one for the next, and a teacher
replica takes one too."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

from orchestrator.config.schema import Resources
from orchestrator.cluster.faults import descendants
from orchestrator.cluster.placement import init_ray
from orchestrator.run.stages import _fit
from orchestrator.cluster.warm_workers import HOOK, prestart_train_workers, stage_env, teacher_runtime_env
from workers.teachers.pool import TeacherPool

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)


def _idle_warm_pids(timeout: float = 60.0) -> set[int]:
    """This process's Ray processes still idle (`ray::IDLE`) whose env has the import hook, once there is at
    least one (another Ray on the machine, e.g. a parallel test's, has its own)."""
    hook = f"{WORKER_PROCESS_SETUP_HOOK_ENV_VAR}={HOOK}".encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = set()
        for pid in descendants(os.getpid()):
            try:
                idle = open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::IDLE")
                if idle and hook in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                    pids.add(pid)
            except OSError:
                continue
        if pids:
            return pids
        time.sleep(0.2)
    raise AssertionError("no prestarted train-worker process appeared")


def test_a_stage_and_a_teacher_take_prestarted_processes_with_the_model_code_imported(tmp_path, tiny_model_dir):
    def worker_facts(config: dict) -> dict:  # defined here: pickled by value, not by this test module's name
        return {"pid": os.getpid(), "runtime_env": ray.get_runtime_context().get_runtime_env_string(),
                "model_code_imported": "workers.training.loop" in sys.modules and "transformers" in sys.modules}

    res = Resources(num_workers=1, cpus_per_worker=1, dashboard=False)
    init_ray(res)
    try:
        prestart_train_workers(res.num_workers)  # as `hkd run` does once Ray is up
        warm = _idle_warm_pids()
        facts = _fit(worker_facts, "warm", {}, res, tmp_path, None, datasets=None)
        warm_after = _idle_warm_pids()  # the fit left one for the next stage
        expected_env = stage_env(hook=True)
        pool = TeacherPool.start("warm-teacher", tiny_model_dir, runtime_env=teacher_runtime_env())
        teacher_pid = pool.info()[0]["pid"]
        pool.shutdown()
    finally:
        ray.shutdown()
    assert facts["pid"] in warm
    assert facts["runtime_env"] == expected_env  # what the prestart asked the raylet for
    assert facts["model_code_imported"]
    assert facts["pid"] not in warm_after
    assert teacher_pid in warm_after  # the teacher's env is the workers': it took the process left idle
