"""Teacher actors: the wire format matches in-process top-k, requests spread, replicas survive a crash."""

from __future__ import annotations

import functools
import os
import signal

import pytest
import ray
import torch

from tests.conftest import TINY
from workers.data import synth
from workers.losses import forward_kl, teacher_topk, topk_forward_kl
from workers.models.model_dirs import build_level, build_tokenizer, label_word_ids, load_model_dir
from workers.models.prompts import collate_records, encode_records, record_units
from workers.teachers.outputs import from_wire
from workers.teachers.pool import TeacherPool, check_compatible, dir_fingerprint, to_numpy_inputs
from workers.inference.logits import position_logits
from workers.teachers.requests import TeacherRequest

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

POOL = "t"


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model_dir):
    p = TeacherPool.start(POOL, tiny_model_dir, replicas=2, num_cpus=0.5, threads=1)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, records):
    """A collated record batch (both tasks) and the same model's in-process full-vocabulary logits at its
    supervised positions."""
    model, processor = load_model_dir(tiny_model_dir)
    batch = collate_records(encode_records(record_units(records[:2] + records[-1:]), processor),
                            processor.tokenizer.pad_token_id, model.config.image_token_id)
    with torch.no_grad():
        logits = position_logits(model.eval(), batch)
    return batch, logits, label_word_ids(processor.tokenizer)


def _infer(pool: TeacherPool, batch: dict, k: int, temperature: float) -> dict[str, torch.Tensor]:
    return from_wire(ray.get(pool.submit(to_numpy_inputs(batch), k, temperature)))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_round_trip_matches_in_process(pool, reference, temperature):
    batch, logits, label_ids = reference
    n, k = logits.shape[0], 8
    out = _infer(pool, batch, k, temperature)
    assert out.kind == "top_k" and {f: (tuple(getattr(out, f).shape), getattr(out, f).dtype) for f in (
        "topk_logprobs", "topk_ids", "tail_logprob", "label_logits")} == {
        "topk_logprobs": ((n, k), torch.float16), "topk_ids": ((n, k), torch.int32),
        "tail_logprob": ((n,), torch.float16), "label_logits": ((n, 2), torch.float32)}
    ref_lp, _, ref_tail = teacher_topk(logits, k, temperature)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    # Ids may swap among near-ties across thread counts: compare values, and the reference at the sent ids.
    torch.testing.assert_close(out.topk_logprobs.float(), ref_lp.float(), atol=5e-3, rtol=0)
    torch.testing.assert_close(log_p.gather(-1, out.topk_ids.long()), out.topk_logprobs.float(),
                               atol=5e-3, rtol=0)
    torch.testing.assert_close(out.tail_logprob.float(), ref_tail.float(), atol=5e-3, rtol=0)
    torch.testing.assert_close(out.label_logits, logits[:, list(label_ids)], atol=1e-4, rtol=1e-4)
    total = torch.cat([out.topk_logprobs.float(), out.tail_logprob.float()[:, None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(n), atol=1e-2, rtol=0)


def test_a_record_with_n_options_gives_n_wire_entries(pool, tiny_model_dir, records):
    """One forward per record: the actor answers every supervised position, in order, from one row each."""
    model, processor = load_model_dir(tiny_model_dir)
    rec = max((r for r in records if r["task"] == "hallucination"), key=lambda r: len(r["options"]))
    claim = next(r for r in records if r["task"] == "factuality")
    n = len(rec["options"])
    assert n >= 2
    batch = collate_records(encode_records(record_units([rec, claim]), processor),
                            processor.tokenizer.pad_token_id, model.config.image_token_id)
    wire = to_numpy_inputs(batch)
    assert wire["input_ids"].shape[0] == 2 and wire["positions"].shape == (n + 1, 2)
    out = _infer(pool, batch, 4, 1.0)
    assert {v.shape[0] for v in (out.topk_logprobs, out.topk_ids, out.tail_logprob, out.label_logits)} == {n + 1}
    with torch.no_grad():
        logits = position_logits(model.eval(), batch)
    label_ids = label_word_ids(processor.tokenizer)
    torch.testing.assert_close(out.label_logits, logits[:, list(label_ids)], atol=1e-4, rtol=1e-4)
    alone = _infer(pool, collate_records(encode_records(record_units([rec]), processor),
                                         processor.tokenizer.pad_token_id, model.config.image_token_id), 4, 1.0)
    torch.testing.assert_close(alone.label_logits, out.label_logits[:n], atol=1e-4, rtol=1e-4)


def test_full_k_has_no_tail_and_matches_forward_kl(pool, reference, tokenizer):
    batch, logits, _ = reference
    out = _infer(pool, batch, len(tokenizer), 2.0)
    assert torch.isneginf(out.tail_logprob).all()
    student = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    wire = topk_forward_kl(student, out.topk_logprobs, out.topk_ids, out.tail_logprob, 2.0)
    torch.testing.assert_close(wire, forward_kl(student, logits, 2.0), rtol=2e-3, atol=1e-4)


def test_requests_spread_over_replicas(pool, reference):
    batch = reference[0]
    before = [i["served"] for i in pool.info()]
    ray.get([pool.submit(to_numpy_inputs(batch), 4, 1.0) for _ in range(4)])
    infos = pool.info()
    assert len({i["pid"] for i in infos}) == 2
    assert [i["served"] - b for i, b in zip(infos, before)] == [2, 2]


def test_connect_by_name_from_a_task(pool, reference):
    @ray.remote(num_cpus=0)
    def worker(inputs: dict) -> tuple:
        out = ray.get(TeacherPool.connect(POOL, replicas=2).submit(inputs, 3, 1.0))
        return out["topk_ids"].shape, out["label_logits"].dtype.name

    shape, dtype = ray.get(worker.remote(to_numpy_inputs(reference[0])))
    assert shape == (reference[1].shape[0], 3) and dtype == "float32"


def test_second_start_reuses_live_replicas(pool, tiny_model_dir):
    again = TeacherPool.start(POOL, tiny_model_dir, replicas=2, num_cpus=0.5, threads=1)
    assert [i["pid"] for i in again.info()] == [i["pid"] for i in pool.info()]


def test_fingerprint_is_the_dirs(pool, tiny_model_dir):
    assert ray.get(pool.handles[0].fingerprint.remote()) == dir_fingerprint(tiny_model_dir)


def test_killed_replica_restarts_and_calls_retry(pool, reference):
    batch, logits, _ = reference
    victim = pool.handles[0]
    old = ray.get(victim.info.remote())
    os.kill(old["pid"], signal.SIGKILL)
    refs = [victim.infer.remote(to_numpy_inputs(batch), 4, 1.0), pool.submit(to_numpy_inputs(batch), 4, 1.0)]
    for out in ray.get(refs, timeout=120):
        assert out["topk_ids"].shape == (logits.shape[0], 4)
    new = ray.get(victim.info.remote())
    assert new["pid"] != old["pid"] and new["restarted"]


def test_tokenizer_mismatch_refused(ray_session, tiny_model_dir, tmp_path):
    other_tok = build_tokenizer(synth.sample_texts(20, seed=3), vocab_size=600)
    other = build_level(tmp_path / "other", TINY, other_tok, image_size=112)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_compatible(tiny_model_dir, other)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        TeacherPool.start("mismatch", tiny_model_dir, student_dir=other)
    check_compatible(tiny_model_dir, tiny_model_dir)


def _request_to(pool: TeacherPool, batch: dict, retries: int, resends: list) -> TeacherRequest:
    """A teacher request for every supervised position of `batch` (no cache), as the train loop makes it."""
    n = len(batch["positions"])
    send = functools.partial(pool.submit, to_numpy_inputs(batch), 4, 1.0)
    return TeacherRequest(None, [str(i) for i in range(n)], [None] * n, list(range(n)), [True] * n, send, retries,
                          lambda: resends.append(1))


def test_call_to_a_replica_gone_for_good_is_resent_to_a_live_one(ray_session, tiny_model_dir, reference):
    batch, logits, label_ids = reference
    two = TeacherPool.start("resend", tiny_model_dir, replicas=2, num_cpus=0.5, threads=1, max_restarts=0)
    try:
        ray.get([h.info.remote() for h in two.handles])
        ray.kill(two.handles[0], no_restart=True)  # the first call goes to replica 0
        resends: list = []
        out = from_wire(_request_to(two, batch, retries=3, resends=resends).result())
        assert resends == [1]
        torch.testing.assert_close(out.topk_logprobs.float(), teacher_topk(logits, 4, 1.0)[0].float(),
                                   atol=5e-3, rtol=0)
        torch.testing.assert_close(out.label_logits, logits[:, list(label_ids)], atol=1e-4, rtol=1e-4)
    finally:
        two.shutdown()


def test_call_fails_clearly_once_its_retries_are_spent(ray_session, tiny_model_dir, reference):
    one = TeacherPool.start("gone", tiny_model_dir, replicas=1, num_cpus=0.5, threads=1, max_restarts=0)
    ray.get(one.handles[0].info.remote())
    ray.kill(one.handles[0], no_restart=True)
    resends: list = []
    with pytest.raises(RuntimeError, match=r"failed 2 times \(teachers.call_retries=1\)"):
        _request_to(one, reference[0], retries=1, resends=resends).result()
    assert resends == [1]
