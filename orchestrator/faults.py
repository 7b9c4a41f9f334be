"""Real faults for the reliability tests and `bench/soak.py`: SIGKILL a teacher replica or a Ray Train worker
of a pipeline that this process drives, and read how far its stage has got.

Processes are found from inside (a teacher reports its own pid) or among this process's descendants, never by
name across the machine, so other pipelines on the same host are never touched. Linux only (/proc).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlflow
import ray

from workers.teacher import actor_name

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


def last_checkpoint_step(uri: str, stage: str) -> int:
    """Step of the stage's latest checkpoint, 0 before the first: rank 0 logs `val/*` at exactly the steps it
    checkpoints. A `loss` logged at a later step proves that checkpoint stored (`ray.train.report` returns
    before the next step runs)."""
    return max(logged_steps(uri, stage, "val/f1"), default=0)
