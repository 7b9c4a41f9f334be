"""Ray start-up and resource budgets: what each train worker gets, chosen so defaults never deadlock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray
from ray.train import ScalingConfig

from orchestrator.config import Placement, Resources


# A private local Ray has no node that a cloud provider drains: Ray Train's preemption watcher (one more actor
# process per stage, started beside the worker group) has nothing to watch there. HKD_PRIVATE_RAY tells every
# process of that Ray (the driver, a sweep trial's) that it is one (`private_ray`).
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "HKD_PRIVATE_RAY": "1"}


def init_ray(res: Resources, teacher_cpus: float = 0.0, custom: dict[str, float] | None = None,
             log_dir: Path | None = None) -> str | None:
    """Join `ray_address` (or RAY_ADDRESS), else start a local Ray sized for the train workers; returns the
    dashboard's URL (None when it is off).

    A local Ray gets the CPUs that train workers and teacher actors reserve (at least the machine's), plus one
    logical CPU more: Ray Data's read/map tasks need a CPU
    while the workers hold theirs, and without the spare one the stage waits forever (seen on 2 cores).
    `custom`: the placement's custom resources, advertised by a local Ray so the same config runs on one machine.
    The local Ray is always a private one (`address="local"`): Ray's default would join whatever cluster
    /tmp/ray/ray_current_cluster last named, even a dead one or another user's.

    The local Ray starts its dashboard unless `resources.dashboard` is false. `log_dir` gets a link to Ray's own
    session logs.
    """
    if ray.is_initialized():
        return _dashboard_url()
    address = res.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": _env_vars_beside_job()}
    if address:
        for key in LOCAL_ONLY_ENV:
            os.environ.pop(key, None)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        need = res.num_workers * res.cpus_per_worker + teacher_cpus
        env["env_vars"].update(LOCAL_ONLY_ENV)
        os.environ.update(LOCAL_ONLY_ENV)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)) + 1, runtime_env=env,
                 resources=custom or None, include_dashboard=res.dashboard,
                 dashboard_host="127.0.0.1", log_to_driver=True)
    if log_dir is not None:
        _link_session_logs(log_dir)
    return _dashboard_url()


def _dashboard_url() -> str | None:
    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - no dashboard
        url = None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def private_ray() -> bool:
    """Whether this process belongs to a local Ray that `init_ray` started for one hkd command."""
    return os.environ.get("HKD_PRIVATE_RAY") == "1"


def _link_session_logs(log_dir: Path) -> None:
    """`<log dir>/ray` → this Ray session's own log dir (raylet, GCS, dashboard, worker files)."""
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        link = log_dir / "ray"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session)
    except Exception:  # noqa: BLE001 - a joined cluster's session dir may not be on this machine
        pass


def _env_vars_beside_job() -> dict[str, str]:
    """Env vars for every Ray process, minus those a submitted job's runtime env already sets: inside
    `ray job submit`, Ray refuses to merge a key that both the job and `ray.init` set."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))  # set by Ray in a job's driver
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    wanted = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    return {k: v for k, v in wanted.items() if k not in taken}


def local_resources(placement: Placement, res: Resources, teacher_replicas: int) -> dict[str, float]:
    """Custom resources a one-machine Ray must advertise for the placement: two teacher pools at once (TCRD)
    and every train worker."""
    need: dict[str, float] = {}
    for role, count in (("teacher", 2 * teacher_replicas), ("student", res.num_workers)):
        for name, amount in getattr(placement, role).items():
            need[name] = need.get(name, 0.0) + amount * count
    return need


def scaling(res: Resources, placement: Placement | None = None) -> ScalingConfig:
    """Train workers: DDP over gloo on CPU, NCCL on GPU (Ray Train picks the backend from use_gpu), each asking
    for the placement's student resources so it lands on a student node."""
    per_worker = {"CPU": res.cpus_per_worker, **(placement.student if placement else {})}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def torch_threads(res: Resources) -> int:
    """Torch threads per worker from its CPU share (Ray sets OMP_NUM_THREADS=1 otherwise)."""
    return max(1, int(res.cpus_per_worker))
