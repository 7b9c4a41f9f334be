"""What a teacher answers, on the wire and in the student: for a batch's supervised positions, its raw label-word
logits and, where it shares the student's tokenizer, its top-k log-probs at T plus the tail's log-mass
(`workers.losses.teacher_topk`); across tokenizers (k = 0) the label-word logits alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from workers.contract import OutputKind
from workers.losses import teacher_topk


@dataclass(frozen=True)
class TeacherOutput:
    """One teacher's answer for P supervised positions: `label_logits` [P, 2] (positive, negative), and for a
    `TOP_K` answer `topk_logprobs`, `topk_ids` [P, k] and `tail_logprob` [P] (None for `LABEL_WORDS`)."""

    kind: OutputKind
    label_logits: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TeacherOutput:
        """The same answer with `fn` applied to every tensor (a row selection, a move to a device)."""
        return dataclasses.replace(self, **{f.name: fn(v) for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device | str) -> TeacherOutput:
        return self.map(lambda v: v.to(device, non_blocking=True))


def wire_outputs(logits: torch.Tensor, label_ids: tuple[int, int], k: int,
                 temperature: float) -> dict[str, np.ndarray]:
    """What a teacher sends for [P, V] supervised-position logits: top-k + tail at T and the raw label-word
    logits; with k = 0 (a student with another tokenizer: label-word KD) the label-word logits alone."""
    label_logits = logits[:, list(label_ids)].float().cpu().numpy()
    if k == 0:
        return {"label_logits": label_logits}
    topk_logprobs, topk_ids, tail = teacher_topk(logits, k, temperature)
    return {
        "topk_logprobs": topk_logprobs.cpu().numpy(),
        "topk_ids": topk_ids.cpu().numpy(),
        "tail_logprob": tail.cpu().numpy(),
        "label_logits": label_logits,
    }


def from_wire(out: dict[str, np.ndarray]) -> TeacherOutput:
    """A wire answer as tensors, its kind told by what it carries; copies, because `ray.get` returns read-only
    arrays."""
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in out.items()}
    return TeacherOutput(OutputKind.TOP_K if "topk_ids" in tensors else OutputKind.LABEL_WORDS, **tensors)
