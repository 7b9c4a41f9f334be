"""What the training loop asks of its runner: rank, world size, device, DDP wrapping, datasets, checkpoints,
metric reports and attempts. `RayTrainContext` answers from Ray Train (a `hkd run` stage); `LocalContext` in this
process, so the same loop (`workers.training.loop.StageRun`) runs without Ray Train: a bench or a test then measures
the product's own objective, data order and checkpoints instead of a copy of them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

ATTEMPTS_FILE = "hkd_attempts"  # in a stage's storage dir: its attempts started so far
CHECKPOINT_PREFIX = "checkpoint_"  # a LocalContext's checkpoint dirs under its storage


class Batches(Protocol):
    """What the loop reads a dataset through: Ray Data's `DataIterator.iter_batches` (and `Dataset`'s)."""

    def iter_batches(self, *, batch_size: int = 256, batch_format: str = "numpy",
                     prefetch_batches: int = 1) -> Iterator[dict[str, np.ndarray]]: ...


class TrainContext(Protocol):
    rank: int
    world: int
    device: torch.device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the steps run through (DDP-wrapped across workers)."""

    def dataset(self, name: str) -> Batches:
        """This worker's view of the stage's dataset `name`."""

    def checkpoint_dir(self) -> AbstractContextManager[Path | None]:
        """The latest checkpoint's dir while the block runs, or None when there is none."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Report metrics, with a checkpoint dir (copied before this returns) or without one."""

    def attempts_before(self) -> int:
        """Attempts of this stage started before this one; counts this one."""


class RayTrainContext:
    """Inside a Ray Train worker. `iterators`: a one-worker stage's datasets by name, handed over in the loop's
    config (`orchestrator.run.stages.one_worker_iterators`); None: read with `ray.train.get_dataset_shard`."""

    def __init__(self, iterators: dict | None = None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.iterators = iterators
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world > 1 else model

    def dataset(self, name: str) -> Batches:
        import ray.train

        return self.iterators[name] if self.iterators else ray.train.get_dataset_shard(name)

    @contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """A barrier: every rank reports equally often."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    def attempts_before(self) -> int:
        """Counted in `ATTEMPTS_FILE` beside Ray Train's checkpoint record in the stage's storage dir (so a re-run
        after a driver crash counts too)."""
        import ray.train
        from pyarrow.fs import FileType

        storage = ray.train.get_context().get_storage()
        fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{ATTEMPTS_FILE}"
        before = 0
        if fs.get_file_info(path).type != FileType.NotFound:
            with fs.open_input_stream(path) as f:
                before = int(f.read().decode() or 0)
        with fs.open_output_stream(path) as f:
            f.write(str(before + 1).encode())
        return before


class LocalContext:
    """In this process: rank 0 of 1, no DDP. Checkpoints are dirs under `storage` (the latest kept), so a second
    run on the same storage resumes from it as a Ray Train restart would; `ATTEMPTS_FILE` is there too.
    `datasets`: by name, anything with `iter_batches` (`ColumnDataset`, a Ray `Dataset`) or a dict of columns."""

    rank, world = 0, 1

    def __init__(self, datasets: dict[str, Batches | dict[str, np.ndarray]], storage: Path, device: str = "cpu"):
        self.datasets = {k: ColumnDataset(v) if isinstance(v, dict) else v for k, v in datasets.items()}
        self.storage, self.device = Path(storage), torch.device(device)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.reports: list[dict] = []  # every reported metrics dict, in order

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def dataset(self, name: str) -> Batches:
        return self.datasets[name]

    def checkpoints(self) -> list[Path]:
        """This storage's checkpoint dirs, oldest first."""
        return sorted(p for p in self.storage.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())

    @contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Keeps `metrics`; a checkpoint is copied in under the next number (complete before it is renamed into
        place, so a crash mid-copy leaves the previous one the latest), then older ones are removed."""
        self.reports.append(dict(metrics))
        if checkpoint is None:
            return
        found = self.checkpoints()
        number = int(found[-1].name.removeprefix(CHECKPOINT_PREFIX)) + 1 if found else 0
        tmp = self.storage / f".tmp_{CHECKPOINT_PREFIX}{number:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp)
        tmp.rename(self.storage / f"{CHECKPOINT_PREFIX}{number:06d}")
        for old in found:
            shutil.rmtree(old)

    def attempts_before(self) -> int:
        path = self.storage / ATTEMPTS_FILE
        before = int(path.read_text() or 0) if path.is_file() else 0
        path.write_text(str(before + 1))
        return before


class ColumnDataset:
    """Columns in memory, read in batches as Ray Data reads an ordered dataset: consecutive rows in stored order,
    full batches of `batch_size` and a shorter last one; so `workers.training.loop.shuffled_batches` gives the same
    batches here as under Ray Train."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns
        self.rows = len(next(iter(columns.values()))) if columns else 0

    def iter_batches(self, *, batch_size: int = 256, batch_format: str = "numpy",
                     prefetch_batches: int = 1) -> Iterator[dict[str, np.ndarray]]:
        if batch_format != "numpy":
            raise ValueError(f"ColumnDataset gives numpy batches only, not {batch_format!r}")
        for i in range(0, self.rows, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.columns.items()}

    def count(self) -> int:
        return self.rows
