"""The optimizer side of a training step, shared by the task loop and the grounding loop: AdamW over the
trainable weights, linear warmup then cosine decay, and one clipped update."""

from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the weights that train (a LoRA stage: only the adapter's)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 10%, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int) -> None:
    """The scheduled learning rate of `step` on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * lr_at(step, total, warmup)


def update(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """One update: gradients of `loss`, clipped to `grad_clip` in global norm, then the optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
