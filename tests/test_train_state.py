"""A resumed attempt continues exactly where the checkpoint left off: weights, optimizer state and step.

(The first version saved checkpoints as a Hugging Face model dir and loaded them with `strict=False`; the
saved names differ from the in-memory ones in transformers 5, so a resume silently restarted from the
initial weights. The fault test's "equals a fault-free run" caught it; these tests catch it in seconds.)
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.config.schema import LoraSettings
from workers.training.checkpoints import load_train_state, save_train_state
from workers.inference.logits import position_logits
from workers.models.lora import add_lora
from workers.models.model_dirs import load_model_dir
from workers.models.prompts import collate_records, encode_records, record_units


@pytest.fixture(scope="module")
def batch(tiny_model_dir, records):
    model, processor = load_model_dir(tiny_model_dir)
    return collate_records(encode_records(record_units(records[:4]), processor),
                           processor.tokenizer.pad_token_id, model.config.image_token_id)


def _student(model_dir, lora: bool):
    model, _ = load_model_dir(model_dir)
    if lora:
        model = add_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]).model_dump())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def _step(model, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    position_logits(model.train(), batch).logsumexp(-1).mean().backward()
    optimizer.step()


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tiny_model_dir, batch, tmp_path, lora):
    model, optimizer = _student(tiny_model_dir, lora)
    for _ in range(3):
        _step(model, optimizer, batch)
    save_train_state(model, optimizer, 3, tmp_path / "ckpt")
    _step(model, optimizer, batch)  # the uninterrupted run's step 4

    resumed, resumed_opt = _student(tiny_model_dir, lora)  # a new attempt: initial weights, fresh optimizer
    assert load_train_state(resumed, resumed_opt, tmp_path / "ckpt") == 3
    _step(resumed, resumed_opt, batch)
    want, got = _trainable(model), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_checkpoint_of_another_model_is_refused(tiny_model_dir, batch, tmp_path):
    model, optimizer = _student(tiny_model_dir, lora=False)
    save_train_state(model, optimizer, 1, tmp_path / "ckpt")
    bigger = torch.nn.Linear(3, 3)
    with pytest.raises(RuntimeError):
        load_train_state(bigger, torch.optim.AdamW(bigger.parameters()), tmp_path / "ckpt")


@pytest.mark.parametrize("kind", ["ray", "local"])
def test_every_restart_logs_where_it_started(tmp_path, monkeypatch, kind):
    """A restart is recorded whether it resumed (the loaded checkpoint's step) or found no registered checkpoint
    and started from scratch (0); the first attempt and other ranks log nothing. The attempts are counted in the
    stage's storage dir: Ray Train's (`RayTrainContext`) or an in-process run's (`LocalContext`)."""
    import types

    import ray.train
    import ray.train.torch
    from pyarrow.fs import LocalFileSystem

    from workers.training.checkpoints import record_attempt
    from workers.training.context import ATTEMPTS_FILE, LocalContext, RayTrainContext

    storage = types.SimpleNamespace(storage_filesystem=LocalFileSystem(), experiment_fs_path=str(tmp_path))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))

    def context(rank: int):
        if kind == "local":
            ctx = LocalContext({}, tmp_path)
            ctx.rank = rank  # as if one of several workers: only rank 0 counts
            return ctx
        monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(
            get_storage=lambda: storage, get_world_rank=lambda: rank, get_world_size=lambda: 2))
        return RayTrainContext()

    logged = []
    logger = types.SimpleNamespace(log=lambda step, values, every: logged.append((step, values)))
    for step, rank in [(0, 0), (0, 1), (0, 0), (77, 0)]:  # first attempt; then from scratch; then resumed
        record_attempt(context(rank), logger, step)
    assert logged == [(0, {"resumed_from_step": 0}), (77, {"resumed_from_step": 77})]
    assert (tmp_path / ATTEMPTS_FILE).read_text() == "3"
