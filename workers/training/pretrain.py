"""Pretraining a tiny base: next-token loss on the answers of generated dialogues (`workers.data.pretrain_corpus`).

A dialogue is one multi-turn chat over one image: each turn's question in a user turn, its answer in an
assistant turn; only answer tokens (and their end-of-turn) are supervised, so one forward carries a dozen
supervised answers about one image (dense, as pretrained VLMs were taught), never a judgement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers import ProcessorMixin

from workers.data import pretrain_corpus, synth
from workers.inference.logits import to_device
from workers.models.families.formats import format_of
from workers.training.grounding import IGNORE, collate, grounding_loss, held_out_metrics
from workers.training.optim import adamw, set_lr, update


@dataclass(frozen=True)
class PretrainSettings:
    """How one base is trained: the same for every level of a pyramid, so no base is handicapped."""

    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    questions: int = 6  # open questions per dialogue, after its description
    eval_every: int = 100


def encode_dialogues(items: list[pretrain_corpus.Dialogue], processor: ProcessorMixin) -> dict[str, np.ndarray]:
    """Chat-template each dialogue (image in the first user turn), tokenize, and label the assistant answers."""
    tok = processor.tokenizer
    texts = []
    for d in items:
        messages = []
        for i, (question, answer) in enumerate(d.turns):
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
    enc = processor(text=texts, images=[[synth.render(d.scene)] for d in items], padding=False, return_tensors=None)
    head = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels = [], []
    for seq in enc["input_ids"]:
        seq = np.asarray(seq, dtype=np.int64)
        lab = np.full_like(seq, IGNORE)
        for start in _starts(seq, head):
            stop = start + int(np.argmax(seq[start:] == end))  # the answer's end-of-turn, supervised too
            lab[start:stop + 1] = seq[start:stop + 1]
        ids.append(seq)
        labels.append(lab)
    return {"input_ids": ids, "labels": labels, **format_of(enc).rows(enc, len(items), np.float32)}


def _starts(seq: np.ndarray, head: list[int]) -> list[int]:
    """Indices just past each occurrence of `head` (the assistant turn's opening) in `seq`."""
    n = len(head)
    return [i + n for i in range(len(seq) - n + 1) if seq[i:i + n].tolist() == head]


def pretrain_base(model: torch.nn.Module, processor: ProcessorMixin, settings: PretrainSettings,
                  spec: synth.SynthSpec, seed: int, device: str = "cpu",
                  log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None) -> list[dict]:
    """Train `model` in place for `settings.steps` steps on fresh dialogues of pretraining stream `seed`; returns
    the curve (train loss per step, held-out loss and token accuracy every `eval_every` steps and at the end).
    Held-out dialogues come from stream `seed + 1_000_000`, never trained on."""
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id

    def batch_of(stream_seed: int, n: int, start: int) -> dict[str, torch.Tensor]:
        items = pretrain_corpus.dialogues(stream_seed, n, spec, settings.questions, start=start)
        return to_device(collate(encode_dialogues(items, processor), pad_id, image_id), device)

    held_out = batch_of(seed + 1_000_000, 128, 0)
    optimizer = adamw(model, settings.lr, settings.weight_decay)
    warmup = max(1, int(settings.warmup_ratio * settings.steps))
    curve, t0 = [], time.perf_counter()
    model.train()
    for step in range(settings.steps):
        batch = batch_of(seed, settings.batch_size, step * settings.batch_size)
        set_lr(optimizer, settings.lr, step, settings.steps, warmup)
        loss = grounding_loss(model, batch)
        update(loss, model, optimizer, settings.grad_clip)
        point = {"step": step + 1, "loss": loss.item(), "s": time.perf_counter() - t0}
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            point.update({k.replace("grounding", "held_out"): v for k, v in held_out_metrics(model, held_out).items()})
        curve.append(point)
        log(step + 1, point)
    return curve
