"""Ray start-up and resource budgets: what each train worker gets, chosen so defaults never deadlock."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data
from ray.train import ScalingConfig

from orchestrator.config.schema import Placement, Resources

# A private local Ray has no node that a cloud provider drains: Ray Train's preemption watcher (one more actor
# process per stage, started beside the worker group) has nothing to watch there. HKD_PRIVATE_RAY tells every
# process of that Ray (the driver, a sweep trial's) that it is one (`private_ray`).
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "HKD_PRIVATE_RAY": "1"}

# What a command's log dir keeps of Ray's own session logs: the session's path, and a bounded copy of a local
# session's files (raylet, GCS, dashboard, workers), whatever becomes of Ray's temp dir afterwards.
SESSION_NOTE = "ray-session.txt"
RAY_LOGS = "ray"
TAIL_BYTES = 1 << 20  # per file: its last MiB (a log that ran for days stays small)
TOTAL_BYTES = 64 << 20  # per session


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

    The local Ray starts its dashboard unless `resources.dashboard` is false. `log_dir` gets the session's path at
    once (`SESSION_NOTE`) and, for a local Ray, a copy of its logs when `stop_ray` ends it.
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
    # the datasets the driver builds carry its DataContext to the workers that read them, and ray.data read
    # RAY_DATA_DISABLE_PROGRESS_BARS when it was imported: set it here
    ray.data.DataContext.get_current().enable_progress_bars = False
    if log_dir is not None:
        _note_session(log_dir, private=not address)
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


@dataclass
class _Session:
    """The Ray session a command's log dir was given for: `logs` (under Ray's temp dir), `into` (the log dir),
    `private` (started by `init_ray` for this command, so its logs are this command's alone)."""
    logs: Path
    into: Path
    private: bool


_session: _Session | None = None


def _session_logs() -> Path | None:
    """The log dir of the Ray session this process is connected to (None without one on this machine)."""
    node = ray._private.worker._global_node if ray.is_initialized() else None
    return Path(node.get_session_dir_path()) / "logs" if node is not None else None


def _note_session(log_dir: Path, private: bool) -> None:
    """Name this Ray session in `<log dir>/ray-session.txt` now (a crash that skips `stop_ray` still leaves it),
    and remember where `stop_ray` copies its logs. No link: Ray's temp dir goes at a reboot or a clean-up of /tmp,
    and a link left dangling in a run dir breaks whatever walks the tree (`ray up` hashes every mounted file)."""
    global _session
    logs = _session_logs()
    if logs is None:  # a Ray Client connection: the session is on another machine
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    where = "this machine" if private else "the cluster's nodes, where `ray logs` and the dashboard read them"
    with open(log_dir / SESSION_NOTE, "a") as note:
        note.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} Ray session {logs.parent}: its logs are in {logs} "
                   f"on {where}\n")
    _session = _Session(logs, log_dir, private)


def stop_ray() -> None:
    """Shut Ray down, then copy a local session's logs (complete only now) into `<log dir>/ray/`, bounded by
    `copy_session_logs`. A joined cluster's session outlives the command and holds other jobs' logs: not copied."""
    global _session
    kept, _session = _session, None
    stopping = _session_logs()
    ray.shutdown()
    if kept is None or not kept.private or kept.logs != stopping:
        return
    left_out = copy_session_logs(kept.logs, kept.into / RAY_LOGS)
    with open(kept.into / SESSION_NOTE, "a") as note:
        note.write(f"  copied into {kept.into / RAY_LOGS} when the command ended (each file's last "
                   f"{TAIL_BYTES >> 20} MiB, {TOTAL_BYTES >> 20} MiB in all)"
                   + (f"; left out: {', '.join(left_out)}" if left_out else "") + "\n")


def copy_session_logs(src: Path, dest: Path, tail: int = TAIL_BYTES, total: int = TOTAL_BYTES) -> list[str]:
    """Copy the regular files under `src` into `dest`, replacing an earlier copy (or the link to a session that
    hkd made before): the latest first, each cut to its last `tail` bytes (errors are at the end), until `total`
    bytes. Links are not followed. Returns the files left out, relative to `src`."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    shutil.rmtree(dest, ignore_errors=True)
    files = [(p.stat(), p) for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    left, left_out = total, []
    for stat, path in sorted(files, key=lambda f: f[0].st_mtime, reverse=True):
        rel = path.relative_to(src)
        size = min(stat.st_size, tail)
        if size > left:
            left_out.append(str(rel))
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as f_in, open(out, "wb") as f_out:
            if size < stat.st_size:
                f_out.write(f"[{stat.st_size - size} bytes before cut; the whole file: {path}]\n".encode())
                f_in.seek(stat.st_size - size)
            f_out.write(f_in.read(size))
        left -= size
    return sorted(left_out)


def _env_vars_beside_job() -> dict[str, str]:
    """Env vars for every Ray process, minus those a submitted job's runtime env already sets: inside
    `ray job submit`, Ray refuses to merge a key that both the job and `ray.init` set.

    Ray Data draws no progress bars: hkd's step bar shows a stage's progress, and a train worker's bars were
    closed only when Ray stopped it, so their last lines ("✔️ Dataset … execution finished") reached the
    driver after hkd's `done in` line, past the console capture."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))  # set by Ray in a job's driver
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    wanted = {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
              "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
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
