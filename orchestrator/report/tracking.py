"""MLflow: where runs go, and the parent/stage run structure of one `hkd run`."""

from __future__ import annotations

import fcntl
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from orchestrator.config.schema import ConfigError  # noqa: E402

SECRET_WORDS = ("token", "password", "secret", "key")
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(configured: str | None, run_root: Path) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else an absolute sqlite file beside the run dirs."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_root.resolve()}/mlflow.db"


@contextmanager
def using_store(uri: str, experiment: str) -> Iterator[None]:
    """Point MLflow at `uri` for the block. `set_tracking_uri` also exports MLFLOW_TRACKING_URI; restore it
    after, or a later run in the same process would inherit this run's store."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def check_reachable(uri: str) -> None:
    """Fail before any training when the tracking store cannot be used. HTTP retries are capped for this
    one call (MLflow's default backoff would take minutes to say a server is down).

    A sqlite store's first use creates its tables; two runs starting at once (two `ray job submit`s) would both
    try and one fails, so that first use happens under a lock file beside the database.
    """
    saved = {k: os.environ.get(k) for k in _QUICK_HTTP}
    os.environ.update(_QUICK_HTTP)
    try:
        with _sqlite_lock(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any transport or store error means the run would fail later
        raise ConfigError(f"tracking.uri: MLflow tracking store {mask_uri(uri)} is not usable: "
                          f"{mask_uri(str(err))[:300]}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def mask_uri(text: str) -> str:
    """Credentials inside URIs (`scheme://user:pass@host`) replaced by `***@`, for logs and params."""
    return _URI_USERINFO.sub("***@", text)


def end_stale_runs(run_dir: Path, experiment: str) -> list[str]:
    """Mark the runs of earlier `hkd run` attempts on this run dir that are still RUNNING (their driver was
    killed) and their stage runs as KILLED, so only a run that really finished reads FINISHED. A run whose
    driver is still alive on this host is left alone. Uses the active tracking store."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    stale = []
    for run in client.search_runs([found.experiment_id],
                                  f"tags.run_dir = '{run_dir}' and attributes.status = 'RUNNING'"):
        if _driver_alive(run.data.tags.get("driver", "")):
            continue
        children = client.search_runs([found.experiment_id],
                                      f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'")
        for r in [*children, run]:
            client.set_terminated(r.info.run_id, "KILLED")
            stale.append(r.info.run_id)
    return stale


def driver_tag() -> str:
    """`host:pid` of this driver, recorded on the parent run so a later attempt can tell a live run from a dead one."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_alive(tag: str) -> bool:
    host, _, pid = tag.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def masked(value: Any, key: str = "") -> Any:
    """A copy that is safe to log: values under secret-looking keys become `***`, URI credentials `***@`."""
    if any(word in key.lower() for word in SECRET_WORDS) and value not in (None, "", {}, []):
        return "***"
    if isinstance(value, dict):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return mask_uri(value) if isinstance(value, str) else value


@contextmanager
def _sqlite_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on `<database>.lock` for a sqlite URI; nothing for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → dotted params, masked like `masked`."""
    out = {}
    for key, value in masked(cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def log_params(params: dict[str, str], client: mlflow.MlflowClient | None = None, run_id: str | None = None) -> None:
    """MLflow caps a batch at 100 params. To the active run, or with `client` to `run_id` (a Tune trial has no
    active run of its own)."""
    items = list(params.items())
    for i in range(0, len(items), 100):
        batch = dict(items[i:i + 100])
        if client is None:
            mlflow.log_params(batch)
        else:
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in batch.items()])
