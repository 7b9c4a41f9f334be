"""The student training loop that runs inside each Ray Train worker, and batched prediction.

One loop serves every stage; direct tuning uses cross-entropy on the answer word only. Rank 0 logs
per-step metrics to the stage's MLflow run, evaluates on the validation split, and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from workers.metrics import binary_metrics
from workers.models import HKDProcessor, label_word_ids, load_model_dir, save_model_dir
from workers.prompts import collate, model_inputs

STATE_FILE = "trainer_state.pt"


def answer_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Full-vocabulary logits at the supervised (last prompt) position: [N, V]."""
    return model(**model_inputs(batch), logits_to_keep=1).logits[:, -1].float()


def positive_prob(logits: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """P(positive) = softmax over the (positive, negative) label-word logits."""
    return torch.softmax(logits[:, list(label_ids)], dim=-1)[:, 0]


def target_token_ids(targets: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """Map 1 → positive word id, 0 → negative word id."""
    return torch.where(targets == 1, label_ids[0], label_ids[1])


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict], label_ids: tuple[int, int]) -> dict[str, np.ndarray]:
    """P(positive) for every unit in the (collated) batches, with uids and targets, in order."""
    was_training = model.training
    model.eval()
    uids, probs, targets = [], [], []
    for batch in batches:
        probs.append(positive_prob(answer_logits(model, batch), label_ids).numpy())
        uids.extend(batch["uid"])
        targets.append(batch["target"].numpy())
    model.train(was_training)
    return {"uid": np.array(uids), "prob": np.concatenate(probs), "target": np.concatenate(targets)}


def task_metrics(pred: dict[str, np.ndarray], tasks: np.ndarray) -> dict[str, float]:
    """Metrics per task plus their mean macro-F1 (the selection metric), keyed like `factuality/f1`."""
    out = {}
    for task in sorted(set(tasks.tolist())):
        sel = tasks == task
        for k, v in binary_metrics(pred["target"][sel], pred["prob"][sel]).items():
            out[f"{task}/{k}"] = v
    out["f1"] = float(np.mean([v for k, v in out.items() if k.endswith("/f1")]))
    return out


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 10%, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop_per_worker(cfg: dict) -> dict:
    """Ray Train entry point. `cfg`: model_dir, out_dir, train (TrainConfig dict), n_units, threads, seed,
    tracking {uri, run_id} or None. Returns the final validation metrics (rank 0)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(cfg["threads"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"] + rank)
    tc = cfg["train"]
    model, processor = load_model_dir(cfg["model_dir"])
    label_ids = label_word_ids(processor.tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    step = _resume(model, optimizer)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    steps_per_epoch = max(1, cfg["n_units"] // (tc["batch_size"] * world))
    total = max(1, round(tc["epochs"] * steps_per_epoch))
    warmup = max(1, int(tc["warmup_ratio"] * total))
    logger = _StepLogger(cfg.get("tracking"), enabled=rank == 0)
    shard = ray.train.get_dataset_shard("train")
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    ddp_model.train()
    while step < total:
        epoch_end = min(total, (step // steps_per_epoch + 1) * steps_per_epoch)
        batches = shard.iter_batches(batch_size=tc["batch_size"], batch_format="numpy", prefetch_batches=2,
                                     drop_last=True)
        t_wait = time.perf_counter()
        for raw in batches:
            if step >= epoch_end:
                break
            batch = collate(raw, pad_id, image_id)
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = tc["lr"] * lr_at(step, total, warmup)
            logits = answer_logits(ddp_model, batch)
            loss = F.cross_entropy(logits, target_token_ids(batch["target"], label_ids))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            optimizer.step()
            step += 1
            logger.log(step, {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                              "data_wait_s": t0 - t_wait, "student_step_s": time.perf_counter() - t0},
                       every=tc["log_every"])
            t_wait = time.perf_counter()
        metrics = _evaluate_rank0(model, processor, label_ids, tc["batch_size"]) if rank == 0 else {}
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, every=1)
        _report(model, processor, optimizer, step, metrics, rank)
    if rank == 0:
        save_model_dir(model, processor, cfg["out_dir"])
    logger.flush()
    return _evaluate_rank0(model, processor, label_ids, tc["batch_size"]) if rank == 0 else {}


def _evaluate_rank0(model: torch.nn.Module, processor: HKDProcessor, label_ids: tuple[int, int],
                    batch_size: int) -> dict[str, float]:
    import ray.train

    val = ray.train.get_dataset_shard("val")
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    tasks, batches = [], []
    for raw in val.iter_batches(batch_size=batch_size * 2, batch_format="numpy"):
        tasks.append(raw["task"])
        batches.append(collate(raw, pad_id, image_id))
    return task_metrics(predict(model, batches, label_ids), np.concatenate(tasks))


def _report(model: torch.nn.Module, processor: HKDProcessor, optimizer: torch.optim.Optimizer, step: int,
            metrics: dict, rank: int) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches a checkpoint of weights + optimizer state."""
    import ray.train

    metrics = {**metrics, "step": step}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_model_dir(model, processor, Path(tmp) / "ckpt")
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, ckpt / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and step from the latest Ray Train checkpoint, if any."""
    import ray.train
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = {}
        for shard in sorted(Path(d).glob("*.safetensors")):
            state.update(load_file(str(shard)))
        model.load_state_dict(state, strict=False)
        saved = torch.load(Path(d) / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    return int(saved["step"])


class _StepLogger:
    """Buffers per-step metrics and sends them to the stage's MLflow run in batches (rank 0 only)."""

    def __init__(self, tracking: dict | None, enabled: bool):
        self.client = None
        self.buffer: list = []
        if enabled and tracking:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def log(self, step: int, values: dict[str, float], every: int) -> None:
        if self.client is None or step % every:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in values.items())
        if len(self.buffer) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []
