"""Teacher-output cache: lossless round trip, keyed by the teacher's weights, corruption never used, size limit,
and the student loop sends only the records with a missing position to the teacher (keys per position)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from workers.models.model_dirs import load_model_dir
from workers.models.prompts import collate_records, encode_records, record_units, select_rows
from workers.teachers.pool import Teacher, TeacherPool, dir_fingerprint, to_numpy_inputs
from workers.teachers.cache import FIELDS, TeacherCache, merge
from tests.conftest import stage_loss_config
from workers.contract import CacheSpec
from workers.teachers.requests import TeacherRequests, position_keys

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

K, T = 8, 2.0
MB = 1 << 20


@pytest.fixture(scope="module")
def batch(tiny_model_dir, records) -> dict:
    """Three Task 1 records (several options each) and three Task 2 records."""
    model, processor = load_model_dir(tiny_model_dir)
    units = record_units(records[:3] + records[-3:])
    return collate_records(encode_records(units, processor), processor.tokenizer.pad_token_id,
                           model.config.image_token_id)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir) -> Teacher:
    return Teacher(tiny_model_dir, threads=1)


def _keys(batch: dict) -> list[str]:
    return position_keys(batch)


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
    assert cache.get(_keys(batch)) == [None] * len(batch["positions"])
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


def test_keys_are_per_position_and_never_collide_within_a_record(batch):
    keys, rows = _keys(batch), batch["positions"][:, 0].tolist()
    assert len(set(keys)) == len(keys) == len(rows)
    for row in range(3):  # Task 1: one key per option, `<record id>#<slot>|<aug_key>`
        mine = [k for k, r in zip(keys, rows) if r == row]
        assert len(mine) == rows.count(row) >= 2
        assert mine == [f"{batch['uid'][row]}#{slot}|{batch['aug_key'][row]}" for slot in range(len(mine))]
    augmented = {**batch, "aug_key": [f"{u}/e1" for u in batch["uid"]]}
    assert not set(_keys(augmented)) & set(keys)  # another view of the same record never hits


def test_selected_rows_keep_width_and_reindex_positions(batch, teacher):
    part = select_rows(batch, [1, 4])
    assert part["input_ids"].shape == (2, batch["input_ids"].shape[1])
    rows = batch["positions"][:, 0]
    expected = batch["positions"][(rows == 1) | (rows == 4)].clone()
    expected[:, 0] = torch.where(expected[:, 0] == 1, 0, 1)
    assert torch.equal(part["positions"], expected)
    alone, whole = teacher.infer(to_numpy_inputs(part), K, T), teacher.infer(to_numpy_inputs(batch), K, T)
    sel = ((rows == 1) | (rows == 4)).numpy()
    torch.testing.assert_close(torch.from_numpy(alone["label_logits"]), torch.from_numpy(whole["label_logits"][sel]),
                               atol=1e-4, rtol=1e-4)


def test_loop_resends_partly_cached_records_whole_and_merges_in_order(tmp_path, tiny_model_dir, batch, teacher):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = TeacherPool.start("cache-test", tiny_model_dir, replicas=1, num_cpus=0.5)
        cfg = stage_loss_config([{"pool": "cache-test", "stage": "T", "temperature": T}], k=K, prefetch=1,
                                cache=CacheSpec(str(tmp_path), 10 * MB))
        keys, rows = _keys(batch), batch["positions"][:, 0].tolist()
        first_of_1 = rows.index(1)
        # record 0 and record 3 wholly cached, record 1 partly (its first option only): 1, 2, 4, 5 go whole
        hit = [i for i, r in enumerate(rows) if r in (0, 3)] + [first_of_1]
        whole = [i for i, r in enumerate(rows) if r in (0, 3)]
        sent = [i for i, r in enumerate(rows) if r not in (0, 3)]
        full = teacher.infer(to_numpy_inputs(batch), K, T)
        TeacherCache(str(tmp_path), dir_fingerprint(tiny_model_dir), K, T, 10 * MB).put(
            [keys[i] for i in hit], {f: v[hit] for f, v in full.items()})
        loss = TeacherRequests(cfg)
        ((_, pending),) = list(loss.with_teacher_outputs(iter([batch])))
        (out,), _ = loss.wait(pending)
        assert pool.info()[0]["served_units"] == len(sent)  # every position of each resent record
        assert loss.stats()["cache/hits"] == len(hit) and loss.stats()["teacher/units"] == len(sent)
        assert out.label_logits.shape[0] == len(keys)
        for f in FIELDS:  # wholly cached records exact; the rest (computed in a smaller batch) to fp16 precision
            torch.testing.assert_close(getattr(out, f)[whole], torch.from_numpy(full[f][whole]), atol=0, rtol=0)
        for f in ("topk_logprobs", "tail_logprob", "label_logits"):  # in the batch's order; ids may swap among ties
            torch.testing.assert_close(getattr(out, f).float(), torch.from_numpy(full[f]).float(), atol=5e-3, rtol=0)
        assert len(_shards(tmp_path)) == 2  # the misses were stored for the next epoch or trial
        again = TeacherCache(str(tmp_path), dir_fingerprint(tiny_model_dir), K, T, 10 * MB)
        assert all(row is not None for row in again.get(keys))
        assert again.stats.bytes_read > 0
        pool.shutdown()
    finally:
        ray.shutdown()
