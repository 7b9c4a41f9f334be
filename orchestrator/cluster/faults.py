"""Real faults for the reliability tests and `bench/soak.py`: SIGKILL a teacher replica or a Ray Train worker
of a pipeline that this process drives, and read how far its stage has got (steps hkd logged to MLflow;
checkpoints Ray Train registered).

Processes are found from inside (a teacher reports its own pid) or among this process's descendants, never by
name across the machine, so other pipelines on the same host are never touched. Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import mlflow
import ray

from workers.teachers.pool import actor_name

TRAIN_WORKER_TITLE = "ray::RayTrainWorker"


def kill_teacher(pool: str, replica: int = 0, namespace: str = "hkd") -> int:
    """SIGKILL one replica's process (pid asked from the actor itself); returns the pid."""
    pid = ray.get(ray.get_actor(actor_name(pool, replica), namespace=namespace).info.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def train_worker_pids(root: int | None = None) -> list[int]:
    """Pids of Ray Train worker processes descended from `root` (default: this process)."""
    return [pid for pid in descendants(root or os.getpid()) if _cmdline(pid).startswith(TRAIN_WORKER_TITLE)]


def kill_train_worker(root: int | None = None) -> int | None:
    """SIGKILL the first Ray Train worker under `root`; returns its pid, None when none runs."""
    pids = train_worker_pids(root)
    if not pids:
        return None
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def descendants(root: int) -> list[int]:
    """All processes below `root` in the process tree, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stage_started(storage: Path, stage: str) -> bool:
    """The stage's Ray Train run has begun (its storage dir exists); its MLflow run is created before that, so
    polling MLflow from then on never races the driver creating the tracking store."""
    return (storage / stage).is_dir()


def logged_steps(uri: str, stage: str, metric: str = "loss") -> list[int]:
    """Steps at which the stage's RUNNING MLflow run has logged `metric` so far (empty before it starts)."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"attributes.run_name = '{stage}' and attributes.status = 'RUNNING'")
    return sorted(m.step for r in runs for m in client.get_metric_history(r.info.run_id, metric))


def registered_checkpoint(storage: Path, stage: str) -> tuple[int, str | None]:
    """Step and dir name of the stage's latest checkpoint that Ray Train has registered, (0, None) before the
    first: what `ray.train.get_checkpoint()` hands the next attempt. Read from the controller's own record
    (`checkpoint_manager_snapshot.json` in the stage's storage dir). A checkpoint that hkd has logged `val/*` for,
    and that sits complete in the storage dir, may not be registered yet: `ray.train.report` returns once the
    checkpoint is uploaded and the report queued, and the controller registers it only when it next polls the
    worker (every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`: `orchestrator.cluster.trainer.POLL_INTERVAL_S`); a worker killed
    before that poll loses it."""
    snapshot = storage / stage / "checkpoint_manager_snapshot.json"
    for _ in range(50):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except FileNotFoundError:
            return 0, None
        except json.JSONDecodeError:  # the controller is rewriting it
            time.sleep(0.1)
            continue
        return (int(latest["metrics"]["step"]), latest["checkpoint_dir_name"]) if latest else (0, None)
    raise RuntimeError(f"{snapshot}: not valid JSON")
