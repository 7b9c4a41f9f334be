"""Teacher-output cache: lossless round trip, keyed by the teacher's weights, corruption never used, size limit,
and the student loop sends only the misses to the teacher."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from workers.models import load_model_dir
from workers.prompts import collate, encode_units, expand_units
from workers.teacher import Teacher, TeacherPool, dir_fingerprint, to_numpy_inputs
from workers.teacher_cache import FIELDS, TeacherCache, merge, unit_key
from tests.conftest import stage_loss_config
from workers.contract import CacheSpec
from workers.teacher_requests import TeacherRequests

K, T = 8, 2.0
MB = 1 << 20


@pytest.fixture(scope="module")
def batch(tiny_model_dir, records) -> dict:
    model, processor = load_model_dir(tiny_model_dir)
    units = expand_units(records)[:6]
    return collate(encode_units(units, processor), processor.tokenizer.pad_token_id, model.config.image_token_id)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir) -> Teacher:
    return Teacher(tiny_model_dir, threads=1)


def _keys(batch: dict) -> list[str]:
    return [unit_key(u, a) for u, a in zip(batch["uid"], batch["aug_key"])]


def _equal_bytes(a: dict, b: dict) -> bool:
    return all(a[f].dtype == b[f].dtype and a[f].tobytes() == b[f].tobytes() for f in FIELDS)


def _shards(root: Path) -> list[Path]:
    return sorted(root.rglob("*.arrow"))


def test_cached_equals_fresh_bitwise(tmp_path, teacher, batch, tiny_model_dir):
    fresh = teacher.infer(to_numpy_inputs(batch), K, T)
    fp = dir_fingerprint(tiny_model_dir)
    TeacherCache(str(tmp_path), fp, K, T, 10 * MB).put(_keys(batch), fresh)
    reopened = TeacherCache(str(tmp_path), fp, K, T, 10 * MB)  # a later trial, reading the shard back
    found = reopened.get(_keys(batch))
    assert all(row is not None for row in found) and reopened.stats.hits == len(found)
    assert _equal_bytes(merge(found, None), fresh)
    assert _equal_bytes(merge(found, None), teacher.infer(to_numpy_inputs(batch), K, T))  # recomputing gives the same
    assert reopened.get(["other|"]) == [None]
    assert TeacherCache(str(tmp_path), fp, K, 1.0, 10 * MB).get(_keys(batch)) == [None] * len(found)  # other T


def test_changed_teacher_never_hits_old_entries(tmp_path, teacher, batch, tiny_model_dir):
    TeacherCache(str(tmp_path / "c"), dir_fingerprint(tiny_model_dir), K, T, 10 * MB).put(
        _keys(batch), teacher.infer(to_numpy_inputs(batch), K, T))
    changed = shutil.copytree(tiny_model_dir, tmp_path / "changed")
    weights = load_file(str(changed / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    cache = TeacherCache(str(tmp_path / "c"), dir_fingerprint(changed), K, T, 10 * MB)
    assert cache.get(_keys(batch)) == [None] * len(batch["uid"])
    assert cache.stats.bytes_read == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_detected_and_recomputed(tmp_path, teacher, batch, tiny_model_dir, damage):
    fp, keys = dir_fingerprint(tiny_model_dir), _keys(batch)
    fresh = teacher.infer(to_numpy_inputs(batch), K, T)
    TeacherCache(str(tmp_path), fp, K, T, 10 * MB).put(keys, fresh)
    (shard,) = _shards(tmp_path)
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    cache = TeacherCache(str(tmp_path), fp, K, T, 10 * MB)
    assert cache.get(keys) == [None] * len(keys)  # never served from the damaged shard
    assert cache.stats.corrupt_shards == 1 and not shard.exists()
    cache.put(keys, teacher.infer(to_numpy_inputs(batch), K, T))  # what the loop does with the misses
    again = TeacherCache(str(tmp_path), fp, K, T, 10 * MB)
    assert _equal_bytes(merge(again.get(keys), None), fresh) and again.stats.corrupt_shards == 0


def test_eviction_keeps_the_root_under_its_limit_oldest_first(tmp_path, teacher, batch, tiny_model_dir):
    fresh = teacher.infer(to_numpy_inputs(batch), K, T)
    keys = _keys(batch)
    probe = TeacherCache(str(tmp_path / "probe"), "fp", K, T, 10 * MB)
    probe.put(keys[:1], {f: v[:1] for f, v in fresh.items()})
    shard_bytes = probe.stats.bytes_written
    limit = int(3.5 * shard_bytes)
    cache = TeacherCache(str(tmp_path / "root"), "fp", K, T, limit)
    for i, key in enumerate(keys):  # one single-row shard per key, oldest first
        cache.put([key], {f: v[i:i + 1] for f, v in fresh.items()})
        time.sleep(0.02)
    sizes = [p.stat().st_size for p in _shards(tmp_path / "root")]
    assert sum(sizes) <= limit and len(sizes) == 3 and cache.stats.evicted_shards == len(keys) - 3
    survivors = TeacherCache(str(tmp_path / "root"), "fp", K, T, limit).get(keys)
    assert [row is not None for row in survivors] == [False] * (len(keys) - 3) + [True] * 3


def test_loop_sends_only_misses_to_the_teacher(tmp_path, tiny_model_dir, batch, teacher):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = TeacherPool.start("cache-test", tiny_model_dir, replicas=1, num_cpus=0.5)
        cfg = stage_loss_config([{"pool": "cache-test", "stage": "T", "temperature": T}], k=K, prefetch=1,
                                cache=CacheSpec(str(tmp_path), 10 * MB))
        keys, hit = _keys(batch), [0, 2, 3]
        full = teacher.infer(to_numpy_inputs(batch), K, T)
        TeacherCache(str(tmp_path), dir_fingerprint(tiny_model_dir), K, T, 10 * MB).put(
            [keys[i] for i in hit], {f: v[hit] for f, v in full.items()})
        loss = TeacherRequests(cfg)
        ((_, pending),) = list(loss.with_teacher_outputs(iter([batch])))
        (out,), _ = loss.wait(pending)
        assert pool.info()[0]["served_units"] == len(keys) - len(hit)
        assert loss.stats()["cache/hits"] == len(hit) and loss.stats()["teacher/units"] == len(keys) - len(hit)
        for f in FIELDS:  # cached rows exact; the misses (computed in a smaller batch) to fp16 precision
            torch.testing.assert_close(out[f][hit], torch.from_numpy(full[f][hit]), atol=0, rtol=0)
        for f in ("topk_logprobs", "tail_logprob", "label_logits"):  # ids may swap among near-ties
            torch.testing.assert_close(out[f].float(), torch.from_numpy(full[f]).float(), atol=5e-3, rtol=0)
        assert len(_shards(tmp_path)) == 2  # the misses were stored for the next epoch or trial
        pool.shutdown()
    finally:
        ray.shutdown()
