"""Give back the resources of Ray Train worker groups whose controller was killed (a trial ASHA stopped).

A worker group's placement group belongs to its Train controller actor, but GCS only frees such a group when
its job ends too. Ray Train's own cleaner is left out on hkd's private local Ray (`orchestrator.cluster.trainer`), and on
a cluster it watches the controller through the dashboard's State API, which a cluster may not serve; without
it the next trial would wait forever for CPUs a dead trial still holds, so the sweep driver removes these groups
itself, silently, reading the GCS table directly.
"""

from __future__ import annotations

import time

import ray
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

_NIL_ACTOR = ray.ActorID.nil().binary()


def remove_orphaned_placement_groups() -> int:
    """Remove live, non-detached placement groups created by an actor that is now dead; returns how many."""
    accessor = ray._private.state.state._connect_and_get_accessor()  # the GCS table with creator fields
    removed = 0
    for blob in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        if (pg.creator_actor_id != _NIL_ACTOR and pg.creator_actor_dead and not pg.is_detached
                and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


class OrphanReaper(Callback):
    """Tune driver callback: at most every `every_s` seconds of the Tune loop, remove orphaned groups."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last, self.removed = every_s, 0.0, 0

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.removed += remove_orphaned_placement_groups()
