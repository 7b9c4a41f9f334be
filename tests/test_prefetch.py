"""The student loop's prefetch: requests run ahead, but batch i's teacher outputs only ever meet batch i."""

from __future__ import annotations

import pytest
import ray
import torch

from workers.losses import teacher_topk
from workers.models.model_dirs import load_model_dir
from workers.models.prompts import collate_records, encode_records, record_units
from workers.teachers.pool import TeacherPool
from tests.conftest import stage_loss_config
from workers.inference.logits import position_logits
from workers.teachers.requests import TeacherRequests

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)


@pytest.fixture(scope="module")
def pool(tiny_model_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield TeacherPool.start("prefetch-test", tiny_model_dir, replicas=2, num_cpus=0.5)
    ray.shutdown()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_outputs_stay_with_their_batch(pool, tiny_model_dir, records, depth):
    model, processor = load_model_dir(tiny_model_dir)
    model.eval()
    units = record_units(records)
    pad, img = processor.tokenizer.pad_token_id, model.config.image_token_id
    batches = [collate_records(encode_records(units[i:i + 3], processor), pad, img) for i in range(0, 18, 3)]
    cfg = stage_loss_config([{"pool": "prefetch-test", "stage": "T", "replicas": 2, "temperature": 2.0}], k=8,
                            prefetch=depth)
    loss_fn = TeacherRequests(cfg)
    seen = []
    for batch, pending in loss_fn.with_teacher_outputs(iter(batches)):
        (out,), wait_s = loss_fn.wait(pending)
        with torch.no_grad():
            expected, _, _ = teacher_topk(position_logits(model, batch), 8, 2.0)
        torch.testing.assert_close(out.topk_logprobs.float(), expected.float(), atol=5e-3, rtol=0)
        assert wait_s >= 0
        seen.append(batch["uid"])
    assert seen == [b["uid"] for b in batches]


def test_requests_run_ahead_of_the_step(pool, tiny_model_dir, records):
    """With depth d, d+1 batches have been submitted when the first one is handed to the step."""
    model, processor = load_model_dir(tiny_model_dir)
    pad, img = processor.tokenizer.pad_token_id, model.config.image_token_id
    units = record_units(records)
    pulled = []

    def source():
        for i in range(0, 15, 3):
            pulled.append(i)
            yield collate_records(encode_records(units[i:i + 3], processor), pad, img)

    cfg = stage_loss_config([{"pool": "prefetch-test", "stage": "T", "replicas": 2}], k=4, prefetch=2)
    gen = TeacherRequests(cfg).with_teacher_outputs(source())
    next(gen)
    assert len(pulled) == 3
