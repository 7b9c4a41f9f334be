"""The Ray Train trainer a stage runs: `TorchTrainer` where there is a process group to connect, and the
same data-parallel trainer without one where there is not; minus the helper actors a stage has no use for.

Imported only where a stage is fitted."""

from __future__ import annotations

import os

from ray.train import ScalingConfig
from ray.train.backend import BackendConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from orchestrator.cluster.placement import private_ray

# How often the train controller polls its workers (Ray's default: 2 s). A stage's end is seen at the next poll,
# so every stage waited a second on average for nothing; a poll is one small actor call per worker.
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def set_poll_interval() -> None:
    """Ray Train hands the interval to the controller and the workers; a value the user exported stays."""
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)


def stage_backend(scaling: ScalingConfig) -> BackendConfig:
    """torch.distributed where there is something to connect: several workers, or a GPU (whose worker
    `TorchConfig` also pins to its device). One CPU worker needs no process group, and without `TorchConfig`
    the train controller, which unpickles the backend config, never imports torch: seconds of CPU per stage
    on 2 cores, on the path to the first step."""
    if scaling.num_workers == 1 and not scaling.use_gpu:
        return BackendConfig()
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if scaling.use_gpu else "gloo")


class StageTrainer(DataParallelTrainer):
    """`TorchTrainer` is this class with `TorchConfig` always; here the backend follows `stage_backend`.

    Each helper actor Ray Train starts is one more process per stage (seconds of CPU on 2 cores, beside the
    worker group's own start). Two are left out where they have nothing to do:
    - the dataset manager, when the trainer has no datasets (a one-worker stage gets its iterators in the
      loop's config, a grounding stage reads none);
    - the placement-group cleaner, on hkd's private local Ray. It frees a worker group's placement group when
      the group's controller dies without doing so; a private Ray ends with its driver, and the groups of
      trials a sweep stops are freed by `orchestrator.cluster.orphans`. On a cluster it runs as Ray made it."""

    def __init__(self, train_loop_per_worker, *, scaling_config: ScalingConfig, **kwargs) -> None:
        set_poll_interval()
        super().__init__(train_loop_per_worker, backend_config=stage_backend(scaling_config),
                         scaling_config=scaling_config, **kwargs)

    def _create_default_callbacks(self) -> list:
        unused = []
        if not self.datasets:
            unused.append(DatasetsCallback)
        if private_ray():
            unused.append(PlacementGroupCleanerCallback)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, tuple(unused))]
