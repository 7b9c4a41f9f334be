"""Augmented training data: the same (id, epoch, seed) encodes to the same sample, through Ray Data too, and the
teacher answers for exactly the augmented batch the student trains on."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import ray
import torch

from orchestrator.config.schema import AugmentSection, ConfigError, load_config
from workers.data.augment import AugmentConfig
from workers.training.epoch_data import encode_augmented, epoch_datasets
from workers.losses import teacher_topk
from workers.models.families import load_processor
from workers.models.model_dirs import load_model_dir
from workers.models.prompts import collate_records, encode_records, record_units
from workers.teachers.pool import TeacherPool
from tests.conftest import stage_loss_config
from workers.inference.logits import position_logits
from workers.teachers.requests import TeacherRequests

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

CFG = AugmentConfig(flip_p=0.5)


def _encode(records: list[dict], processor, epoch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return encode_augmented({"record": np.array([json.dumps(r) for r in records])}, processor, epoch, seed, CFG)


def _rows(batch: dict) -> dict[str, tuple]:
    """uid|aug_key → (token ids, pixel bytes)."""
    return {f"{u}|{a}": (tuple(ids.tolist()), px.tobytes())
            for u, a, ids, px in zip(batch["uid"], batch["aug_key"], batch["input_ids"], batch["pixel_values"])}


def test_same_key_same_encoded_sample(records, tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    first, again = _encode(records[:8], processor, epoch=1), _encode(records[:8], processor, epoch=1)
    assert _rows(first) == _rows(again)
    other_epoch, other_seed = _encode(records[:8], processor, epoch=2), _encode(records[:8], processor, 1, seed=7)
    plain = encode_records(record_units(records[:8]), processor)
    for other in (other_epoch, other_seed):
        assert set(_rows(other)).isdisjoint(_rows(first))  # a new key per (epoch, seed)
        assert {v[1] for v in _rows(other).values()} != {v[1] for v in _rows(first).values()}
    assert not {px.tobytes() for px in plain["pixel_values"]} & {v[1] for v in _rows(first).values()}
    assert sorted(first["uid"]) == sorted(plain["uid"])  # one row per record (Task 1 options permuted within it)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_epochs_match_the_direct_map(ray_session, records, tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    epochs = epoch_datasets(records, processor, epochs=2, seed=0, cfg=CFG)
    for epoch, ds in enumerate(epochs):
        rows = {}
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
            rows.update(_rows(batch))
        assert rows == _rows(_encode(records, processor, epoch))


def test_small_split_encoded_in_the_driver_is_the_ray_data_maps(ray_session, records, tiny_model_dir,
                                                                  monkeypatch):
    """`encode_split` encodes a split of ≤ DRIVER_ENCODE_RECORDS records in the driver: the same rows, values,
    dtypes and order as its Ray Data map gives (the map path forced with a limit of 0)."""
    from orchestrator.run import inputs as stages

    processor = load_processor(tiny_model_dir)
    here = stages.encode_split(records, processor)
    monkeypatch.setattr(stages, "DRIVER_ENCODE_RECORDS", 0)
    mapped = stages.encode_split(records, processor)
    assert here.count() == mapped.count() == len(records) and here.schema() == mapped.schema()
    batches = [list(ds.iter_batches(batch_size=5, batch_format="numpy")) for ds in (here, mapped)]
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            for x, y in zip(a[key], b[key], strict=True):
                x, y = np.asarray(x), np.asarray(y)
                assert x.dtype == y.dtype and np.array_equal(x, y), key


def test_teacher_answers_the_batch_the_student_trains_on(ray_session, records, tiny_model_dir):
    """Online distillation on augmented data: the outputs paired with each augmented batch are the teacher's
    answer on that very batch (not on the original images or text)."""
    model, processor = load_model_dir(tiny_model_dir)
    model.eval()
    pad, img = processor.tokenizer.pad_token_id, model.config.image_token_id
    augmented = _encode(records[:6], processor, epoch=0)
    batches = [collate_records({k: v[i:i + 4] for k, v in augmented.items()}, pad, img) for i in (0, 4)]
    pool = TeacherPool.start("online-aug", tiny_model_dir, replicas=1, num_cpus=0.5)
    loss = TeacherRequests(stage_loss_config([{"pool": "online-aug", "stage": "T"}], k=8, prefetch=1))
    plain = encode_records(record_units(records[:6]), processor)
    plain_by_uid = {u: i for i, u in enumerate(plain["uid"])}
    for batch, pending in loss.with_teacher_outputs(iter(batches)):
        (out,), _ = loss.wait(pending)
        with torch.no_grad():
            on_batch, _, _ = teacher_topk(position_logits(model, batch), 8, 1.0)
            rows = [plain_by_uid[u] for u in batch["uid"]]
            original = collate_records({k: v[rows] for k, v in plain.items()}, pad, img)
            on_original, _, _ = teacher_topk(position_logits(model, original), 8, 1.0)
        torch.testing.assert_close(out.topk_logprobs.float(), on_batch.float(), atol=5e-3, rtol=0)
        assert not torch.allclose(out.topk_logprobs.float(), on_original.float(), atol=5e-3)
        assert all(batch["aug_key"])
    pool.shutdown()


def test_augment_section_mirrors_augment_config(tmp_path):
    assert set(AugmentSection.model_fields) == {f.name for f in fields(AugmentConfig)} | {"enabled"}
    assert AugmentSection().transforms() == AugmentConfig() and not AugmentSection().enabled
    assert load_config("configs/paper.yaml").augment.enabled and not load_config("configs/quickstart.yaml").augment.enabled
    path = tmp_path / "c.yaml"
    path.write_text("levels: {S: {}}\ndirect: {levels: [S]}\naugment: {enabled: true, brightnes: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'augment.brightnes' \(did you mean 'brightness'\?\)"):
        load_config(path)
    path.write_text("levels: {S: {}}\ndirect: {levels: [S]}\naugment: {crop_scale: 1.5}\n")
    with pytest.raises(ConfigError, match="'augment.crop_scale': Input should be less than 1"):
        load_config(path)


def test_training_order_interleaves_the_tasks():
    """The files store one task after the other; training must not see one task alone for half an epoch."""
    from orchestrator.run.unlabeled import by_task, spread

    records = [{"id": f"h{i}", "task": "hallucination"} for i in range(30)]
    records += [{"id": f"f{i}", "task": "factuality"} for i in range(10)]
    order = spread(by_task(records))
    assert sorted(r["id"] for r in order) == sorted(r["id"] for r in records)
    for start in range(0, 40, 8):  # every window of 8 holds both tasks, each task in its own order
        assert {r["task"] for r in order[start:start + 8]} == {"hallucination", "factuality"}
    assert [r["id"] for r in order if r["task"] == "factuality"] == [f"f{i}" for i in range(10)]


def test_each_epoch_is_shuffled_from_its_seed(ray_session):
    from workers.training.loop import shuffled_batches

    ds = ray.data.from_items([{"i": i} for i in range(256)]).materialize()

    def epoch(seed: int, e: int) -> list[int]:
        return [int(i) for b in shuffled_batches(ds.iterator(), 32, seed, e) for i in b["i"]]

    first = epoch(0, 0)
    assert sorted(first) == list(range(256)) and first != list(range(256))
    assert epoch(0, 0) == first  # deterministic
    assert epoch(0, 1) != first and epoch(1, 0) != first  # anew per epoch and per training seed
