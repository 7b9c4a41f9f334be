"""Inference shared by training, evaluation and the teacher actor: the logits at every supervised position of
a record batch (one forward per record), P(positive), predictions over batches and their metrics per task."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from workers.inference.metrics import binary_metrics
from workers.models.prompts import model_inputs


def position_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Full-vocabulary logits at every supervised position of a record batch (`batch["positions"]`, [P, 2]
    (row, column)): [P, V]. The LM head runs only on the columns some row supervises."""
    cols, index = torch.unique(batch["positions"][:, 1], return_inverse=True)
    logits = model(**model_inputs(batch), logits_to_keep=cols).logits
    return logits[batch["positions"][:, 0], index].float()


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Tensors of a batch onto the device (uids and other lists stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def positive_prob(logits: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """P(positive) = softmax over the (positive, negative) label-word logits."""
    return torch.softmax(logits[:, list(label_ids)], dim=-1)[:, 0]


def target_token_ids(targets: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """Map 1 → positive word id, 0 → negative word id."""
    return torch.where(targets == 1, label_ids[0], label_ids[1])


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict], label_ids: tuple[int, int]) -> dict[str, np.ndarray]:
    """P(positive) at every supervised position of the (collated record) batches, in order, with its uid
    (`"<record id>#<slot>"`), target and task."""
    was_training = model.training
    model.eval()
    uids, probs, targets, tasks = [], [], [], []
    for batch in batches:
        probs.append(positive_prob(position_logits(model, batch), label_ids).cpu().numpy())
        rows, slots = batch["positions"][:, 0].tolist(), batch["slot"].tolist()
        uids.extend(f"{batch['uid'][r]}#{s}" for r, s in zip(rows, slots))
        targets.append(batch["target"].cpu().numpy())
        tasks.extend(batch["row_task"])
    model.train(was_training)
    return {"uid": np.array(uids), "prob": np.concatenate(probs), "target": np.concatenate(targets),
            "task": np.array(tasks)}


def task_metrics(pred: dict[str, np.ndarray], tasks: np.ndarray) -> dict[str, float]:
    """Metrics per task plus their mean macro-F1 (the selection metric), keyed like `factuality/f1`."""
    out = {}
    for task in sorted(set(tasks.tolist())):
        sel = tasks == task
        for k, v in binary_metrics(pred["target"][sel], pred["prob"][sel]).items():
            out[f"{task}/{k}"] = v
    out["f1"] = float(np.mean([v for k, v in out.items() if k.endswith("/f1")]))
    return out
