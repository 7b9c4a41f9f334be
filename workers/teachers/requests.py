"""Teacher requests of a training stage: prefetch, the teacher-output cache, and resends after a crash.

Teacher outputs for batch i+`prefetch` are requested before step i is computed, so teacher latency hides
behind student compute; each batch carries its own requests, so outputs never cross batches. With a cache
(`StageLossConfig.cache`), each teacher's cache is asked first, per supervised position (key
`"<record id>#<slot>|<aug_key>"`); a record with any missing position goes to the teacher whole (one forward
per record), and all its positions' answers are stored for later epochs and trials.

A teacher whose processor differs from the student's gets its own encoding of the batch's records
(`batch["teacher_inputs"]`, collated by the train loop): the same records in the same order with one supervised
position per option or claim in every family, so its answers line up with the student's positions. A teacher
with another tokenizer (`label_words`) is asked for its label-word logits alone (k = 0).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from workers.contract import StageLossConfig, TeacherSpec
from workers.teachers.outputs import TeacherOutput, from_wire


class TeacherRequests:
    """The stage's teacher traffic: `with_teacher_outputs` pairs each batch with its pending requests, `wait`
    turns them into teacher outputs on the device, `stats` counts calls, rows, resends and cache use."""

    def __init__(self, cfg: StageLossConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, device
        self.caches: list = []
        self.teacher_calls = self.teacher_units = self.teacher_resends = 0

    def with_teacher_outputs(self, batches: Iterable[dict]) -> Iterator[tuple[dict, list]]:
        """Yield (batch, pending teacher requests) keeping `prefetch` batches in flight ahead."""
        if not self.cfg.teachers:
            yield from ((b, []) for b in batches)
            return
        from workers.teachers.pool import TeacherPool

        pools = [TeacherPool.connect(t.pool, t.replicas) for t in self.cfg.teachers]
        if self.cfg.cache and not self.caches:
            self.caches = [self._open_cache(pool, self.k(t), t.temperature)
                           for t, pool in zip(self.cfg.teachers, pools)]
        queue: deque = deque()
        for batch in batches:
            queue.append((batch, [self._request(batch, pool, t, i)
                                  for i, (t, pool) in enumerate(zip(self.cfg.teachers, pools))]))
            if len(queue) > self.cfg.prefetch:
                yield queue.popleft()
        yield from queue

    def k(self, teacher: TeacherSpec) -> int:
        """Top-k entries the teacher sends: none (its label-word logits alone) for label-word KD."""
        return 0 if teacher.label_words else self.cfg.k

    def _open_cache(self, pool, k: int, temperature: float):
        import ray

        from workers.teachers.cache import TeacherCache

        fingerprint = ray.get(pool.handles[0].fingerprint.remote())  # hashed once per actor
        return TeacherCache(self.cfg.cache.root, fingerprint, k, temperature, self.cfg.cache.max_bytes)

    def _request(self, batch: dict, pool, teacher: TeacherSpec, index: int) -> TeacherRequest:
        from workers.models.prompts import select_rows
        from workers.teachers.pool import to_numpy_inputs

        inputs = teacher_batch(batch, teacher)
        cache = self.caches[index] if self.caches else None
        keys = position_keys(batch)
        found = cache.get(keys) if cache else [None] * len(keys)
        rows = batch["positions"][:, 0].tolist()
        resend = {rows[i] for i, row in enumerate(found) if row is None}
        # every position of a resent record comes back fresh, in the batch's position order
        missing = [i for i, r in enumerate(rows) if r in resend]
        store = [found[i] is None for i in missing]  # what the cache lacked (the rest it holds already)
        found = [None if r in resend else row for r, row in zip(rows, found)]
        send = None
        if missing:
            whole = len(resend) == len(batch["input_ids"])
            wire = to_numpy_inputs(inputs if whole else select_rows(inputs, sorted(resend)))
            send = functools.partial(pool.submit, wire, self.k(teacher), teacher.temperature)  # again on a crash
            self.teacher_calls += 1
            self.teacher_units += len(missing)
        return TeacherRequest(cache, keys, found, missing, store, send, self.cfg.call_retries, self._count_resend)

    def _count_resend(self) -> None:
        self.teacher_resends += 1

    def wait(self, pending: list[TeacherRequest]) -> tuple[list[TeacherOutput], float]:
        """The teacher outputs of one batch (one per teacher, on the device) and the seconds waited."""
        if not pending:
            return [], 0.0
        t0 = time.perf_counter()
        outs = [from_wire(r.result()).to(self.device) for r in pending]
        return outs, time.perf_counter() - t0

    def stats(self) -> dict[str, float]:
        """Teacher calls and rows actually computed, plus the caches' counters summed over teachers."""
        if not self.cfg.teachers:
            return {}
        out = {"teacher/calls": float(self.teacher_calls), "teacher/units": float(self.teacher_units),
               "teacher/resends": float(self.teacher_resends)}
        for cache in self.caches:
            for key, value in cache.stats.as_metrics().items():
                out[key] = out.get(key, 0.0) + value
        return out


def teacher_batch(batch: dict, teacher: TeacherSpec) -> dict:
    """What the teacher reads: the student's batch, or its own encoding of the same records, which must have
    the same supervised positions row by row (checked: a mismatch would pair answers with the wrong options)."""
    if teacher.inputs is None:
        return batch
    own = batch["teacher_inputs"][teacher.inputs.prefix]
    if not torch.equal(own["positions"][:, 0], batch["positions"][:, 0].cpu()) or own["uid"] != batch["uid"]:
        raise ValueError(f"teacher {teacher.stage}: its encoding of the batch has other records or positions "
                         "than the student's")
    return own


def position_keys(batch: dict) -> list[str]:
    """The teacher-cache key of every supervised position of a collated record batch, in order:
    `"<record id>#<slot>|<aug_key>"`, so two positions of one record never share a key."""
    from workers.teachers.cache import unit_key

    rows, slots = batch["positions"][:, 0].tolist(), batch["slot"].tolist()
    return [unit_key(f"{batch['uid'][r]}#{s}", batch["aug_key"][r]) for r, s in zip(rows, slots)]


class TeacherRequest:
    """One teacher's answer for one batch: positions found in the cache plus a teacher call for the records with
    a miss (`missing`: the indices of those records' positions, in order; their `found` entries are None).

    Ray retries a call whose replica dies (`max_task_retries`), but a replica killed again while the call is
    queued, or one that is restarting, can still fail it with a `RayActorError`. The call is then sent again,
    to whichever replica is least busy, after a growing pause (1, 2, 4 … 30 s), up to `retries` times: teacher
    crashes cost seconds inside the worker instead of a Ray Train worker failure (`max_failures`).
    """

    def __init__(self, cache, keys: list[str], found: list, missing: list[int], store: list[bool], send,
                 retries: int, on_resend):
        self.cache, self.keys, self.found, self.missing, self.store = cache, keys, found, missing, store
        self.send, self.retries, self.on_resend = send, retries, on_resend
        self.ref = send() if send is not None else None

    def result(self) -> dict[str, np.ndarray]:
        from workers.teachers.cache import merge

        fresh = self._fetch() if self.ref is not None else None
        if self.cache is None:
            return fresh
        if fresh is not None:
            new = np.flatnonzero(self.store)
            self.cache.put([self.keys[self.missing[j]] for j in new], {f: v[new] for f, v in fresh.items()})
        return merge(self.found, fresh, self.cache.fields)

    def _fetch(self) -> dict[str, np.ndarray]:
        import ray
        from ray.exceptions import RayActorError

        for attempt in itertools.count():
            try:
                return ray.get(self.ref)
            except RayActorError as err:
                if attempt >= self.retries:
                    raise RuntimeError(f"teacher call failed {attempt + 1} times (teachers.call_retries="
                                       f"{self.retries}); its replicas are gone: {err}") from err
                time.sleep(min(2.0 ** attempt, 30.0))
                self.ref = self.send()
                self.on_resend()
