"""A stage's processes started before the stage asks for them, the train workers with the model code already
imported (hkd's private local Ray only).

Each stage used to start its controller, its synchronization actor and its train workers as new processes: on 2
cores, starting Python and Ray and then importing torch, transformers and the model code in the worker was over
half of a stage's fixed cost, all of it on the path to the first step. Ray gives an actor an idle process that
never ran anything and has the actor's runtime env, but prestarts such processes only as it starts, with the
job's env. So hkd asks the raylet for them itself, through the call Ray's own prestart uses (`PrestartWorkers`),
with exactly the runtime envs Ray Train gives these actors; the workers' env has a setup hook
(`workers.training.warm.import_loops`) that imports the model code as the process starts. Teacher replicas get the
workers' env too, so that they take such processes as well. hkd asks once Ray is up and after each stage's fit,
for the next stage: the imports then run while the driver encodes the data or tests the stage. A process no
stage takes exits after `KEEP_ALIVE_S`, or with the private Ray.

On a cluster nothing changes: workers and teachers start as before, and their runtime envs have no hook."""

from __future__ import annotations

import json
import logging

import ray
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

from orchestrator.cluster.placement import private_ray

HOOK = "workers.training.warm.import_loops"
KEEP_ALIVE_S = 300
log = logging.getLogger(__name__)


def worker_runtime_env() -> dict:
    """The runtime env a stage's train workers get (`RunConfig.worker_runtime_env`): the import hook, on a
    private Ray; nothing elsewhere."""
    return {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK}} if private_ray() else {}


def teacher_runtime_env() -> dict | None:
    """The runtime env of teacher replicas (started by this process): the train workers' on a private Ray, so
    that they take the same warm processes; None elsewhere."""
    return json.loads(stage_env(hook=True)) if private_ray() else None


def prestart_train_workers(n: int, teachers: int = 0) -> None:
    """Start a stage's processes now, for the next stage to take: `n` train workers and `teachers` new teacher
    replicas (the import hook), and, with workers, the controller and synchronization actor (the controller's
    env, nothing to import). A faster start, never a failure: if the call fails (another Ray version), stages
    start their processes as before."""
    if not private_ray() or n + teachers < 1:
        return
    try:
        _prestart(stage_env(hook=True), n + teachers)  # first: the raylet starts no more than its free CPUs
        if n:
            _prestart(stage_env(hook=False), 2)
        # Ray Data's stats actor starts at a dataset's first run: from the driver, not from a train worker,
        # whose env (the hook) it would inherit, taking a warm process or importing torch for nothing.
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
    except Exception as err:  # noqa: BLE001 - an optimisation; the stage starts its own processes without it
        log.debug("prestarting a stage's processes failed: %s", err)


def stage_env(hook: bool) -> str:
    """The serialized runtime env of a stage's processes, as the raylet compares it. The controller's is this
    process's (the job's in `hkd run`, a trial's in a sweep) plus the env vars Ray Train passes on and one it
    adds; the synchronization actor inherits it. With `hook`, a train worker's: the controller creates them,
    with the same passed-on vars, then `worker_runtime_env`. Keys sorted, compact, as Ray's C++ side writes it."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as WARN
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as WARN_VALUE,
    )
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from orchestrator.cluster.trainer import (
        set_poll_interval,  # Ray Train passes the poll interval on: set it first
    )

    set_poll_interval()
    parent = json.loads(ray.get_runtime_context().get_runtime_env_string() or "{}")  # the job's, in the driver
    env_vars = {**parent.get("env_vars", {}), WARN: WARN_VALUE, **get_env_vars_to_propagate(),
                **(worker_runtime_env()["env_vars"] if hook else {})}
    return json.dumps({**parent, "env_vars": env_vars}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _prestart(env: str, n: int) -> None:
    from ray._private.grpc_utils import (
        init_grpc_channel,  # with Ray's auth token, when Ray has one
    )
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo

    worker = ray._private.worker.global_worker
    raylet = node_manager_pb2_grpc.NodeManagerServiceStub(
        init_grpc_channel(f"{worker.node.node_ip_address}:{worker.node.node_manager_port}"))
    raylet.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON, job_id=worker.current_job_id.binary(),
        runtime_env_info=RuntimeEnvInfo(serialized_runtime_env=env), keep_alive_duration_secs=KEEP_ALIVE_S,
        num_workers=n), timeout=10)
