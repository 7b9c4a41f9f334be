"""MLflow: where runs go, and the parent/stage run structure of one `hkd run`."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

SECRET_WORDS = ("token", "password", "secret", "key")


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
    """Fail before any training when the tracking store cannot be used.

    A sqlite store's first use creates its tables; two runs starting at once (two `ray job submit`s) would both
    try and one fails, so that first use happens under a lock file beside the database.
    """
    try:
        with _sqlite_lock(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any transport or store error means the run would fail later
        raise RuntimeError(f"MLflow tracking store {uri} is not usable: {err}") from None


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
    """Nested config → dotted params, secret-looking values masked."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        elif any(word in str(key).lower() for word in SECRET_WORDS) and value not in (None, "", {}):
            out[name] = "***"
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
