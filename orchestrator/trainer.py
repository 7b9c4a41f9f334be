"""The `TorchTrainer` a stage runs: Ray Train's own, minus the helper actors a stage has no use for.

Imported only where a stage is fitted (it imports torch through Ray's `TorchConfig`)."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from orchestrator.placement import private_ray


class StageTrainer(TorchTrainer):
    """Each helper actor Ray Train starts is one more process per stage (seconds of CPU on 2 cores, beside the
    worker group's own start). Two are left out where they have nothing to do:
    - the dataset manager, when the trainer has no datasets (a one-worker stage gets its iterators in the
      loop's config, a grounding stage reads none);
    - the placement-group cleaner, on hkd's private local Ray. It frees a worker group's placement group when
      the group's controller dies without doing so; a private Ray ends with its driver, and the groups of
      trials a sweep stops are freed by `orchestrator.orphans`. On a cluster it runs as Ray made it."""

    def _create_default_callbacks(self) -> list:
        unused = []
        if not self.datasets:
            unused.append(DatasetsCallback)
        if private_ray():
            unused.append(PlacementGroupCleanerCallback)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, tuple(unused))]
