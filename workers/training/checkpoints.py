"""Checkpoints of the training loops: what a resumed attempt needs (trainable weights, optimizer state, step),
reported by rank 0 through the loop's context (`workers.training.context`: Ray Train, or in process) and restored
from its latest checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workers.models.lora import ADAPTER_DIR, is_lora, load_adapter_weights

if TYPE_CHECKING:
    from workers.training.context import TrainContext

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "weights.safetensors"  # a checkpoint's weights, named as the model holds them in memory


def report_checkpoint(ctx: TrainContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                      metrics: dict) -> None:
    """Every rank reports (under Ray Train it is a barrier); rank 0 attaches a checkpoint of weights + optimizer
    state."""
    metrics = {**metrics, "step": step}
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_train_state(model, optimizer, step, Path(tmp))
        ctx.report(metrics, Path(tmp))


def resume(ctx: TrainContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and step from the context's latest checkpoint, if any."""
    with ctx.checkpoint_dir() as d:
        return 0 if d is None else load_train_state(model, optimizer, d)


def record_attempt(ctx: TrainContext, logger, step: int) -> None:
    """Rank 0 counts this attempt; every restart logs `resumed_from_step`: the step of the checkpoint it loaded,
    0 when it starts from scratch. A restart is not always a resume: under Ray Train a reported checkpoint counts
    only once the controller has polled the worker and registered it (`ray.train.get_checkpoint()` returns the
    latest one registered), so a worker killed between its report and that poll leaves none, or only an older one."""
    if ctx.rank == 0 and (ctx.attempts_before() or step):
        logger.log(step, {"resumed_from_step": step}, every=1)


def save_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, ckpt: Path) -> None:
    """What a resumed attempt needs: the trainable weights under their in-memory names (a LoRA stage: only the
    adapter, the base never changes), the optimizer state and the step."""
    from safetensors.torch import save_model

    ckpt.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.save_pretrained(ckpt / ADAPTER_DIR)
    else:
        save_model(model, str(ckpt / WEIGHTS_FILE))
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, ckpt / STATE_FILE)


def load_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> int:
    """Inverse of `save_train_state`; every weight must match by name and shape (strict), so a checkpoint
    from another model fails loudly instead of resuming from the initial weights. Returns the step."""
    from safetensors.torch import load_model

    if is_lora(model):
        load_adapter_weights(model, ckpt / ADAPTER_DIR)
    else:
        load_model(model, str(ckpt / WEIGHTS_FILE), strict=True)
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    return int(saved["step"])
