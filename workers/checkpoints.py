"""Checkpoints of the training loops: what a resumed attempt needs (trainable weights, optimizer state, step),
reported to Ray Train by rank 0 and restored from its latest checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from workers.lora import ADAPTER_DIR, is_lora, load_adapter_weights

STATE_FILE = "trainer_state.pt"
ATTEMPTS_FILE = "hkd_attempts"  # in a stage's Ray Train storage dir: its attempts started so far
WEIGHTS_FILE = "weights.safetensors"  # a checkpoint's weights, named as the model holds them in memory


def report_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, metrics: dict,
                      rank: int) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches a checkpoint of weights + optimizer state."""
    import ray.train

    metrics = {**metrics, "step": step}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_train_state(model, optimizer, step, Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and step from the latest Ray Train checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        return load_train_state(model, optimizer, Path(d))


def record_attempt(logger, step: int, rank: int) -> None:
    """Rank 0 counts this attempt; every restart logs `resumed_from_step`: the step of the checkpoint it loaded,
    0 when it starts from scratch. A restart is not always a resume: a reported checkpoint counts only once the
    controller has polled the worker and registered it (`ray.train.get_checkpoint()` returns the latest one
    registered), so a worker killed between its report and that poll leaves none, or only an older one."""
    if rank == 0 and (attempts_before() or step):
        logger.log(step, {"resumed_from_step": step}, every=1)


def attempts_before() -> int:
    """Attempts of this stage started before this one, counted in `ATTEMPTS_FILE` beside Ray Train's checkpoint
    record in the stage's storage dir (so a re-run after a driver crash counts too); counts this one."""
    import ray.train
    from pyarrow.fs import FileType

    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{ATTEMPTS_FILE}"
    before = 0
    if fs.get_file_info(path).type != FileType.NotFound:
        with fs.open_input_stream(path) as f:
            before = int(f.read().decode() or 0)
    with fs.open_output_stream(path) as f:
        f.write(str(before + 1).encode())
    return before


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
