"""Grounding pre-training for the embedded tiny levels: describe a fresh random scene, token by token.

Real pyramid levels are pretrained VLMs that already name what they see; a random-init tiny level is
not, and a yes/no answer per sample is too sparse a signal to learn vision from. This stage gives each
tiny level what pretraining gives a real one: next-token cross-entropy on a dense scene description
(`synth.describe`: size, colour, shape and cell of every object) of unlimited generated images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ProcessorMixin

from workers.contract import GroundingJob
from workers.data import synth
from workers.models.families.formats import format_of
from workers.models.model_dirs import load_model_dir, save_model_dir
from workers.models.prompts import GROUNDING_PROMPT

IGNORE = -100


def encode_scenes(scenes: list[dict], processor: ProcessorMixin) -> dict[str, np.ndarray]:
    """Prompt (image + request) followed by the description and end of turn; labels only on the latter."""
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": GROUNDING_PROMPT}]}],
        add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt] * len(scenes), images=[[synth.render(s)] for s in scenes], padding=False,
                    return_tensors=None)
    ids, labels = [], []
    for prompt_ids, scene in zip(enc["input_ids"], scenes):
        answer = tok.encode(synth.describe(scene) + tok.eos_token, add_special_tokens=False)
        ids.append(np.asarray(list(prompt_ids) + answer, dtype=np.int64))
        labels.append(np.asarray([IGNORE] * len(prompt_ids) + answer, dtype=np.int64))
    return {"input_ids": ids, "labels": labels, **format_of(enc).rows(enc, len(scenes), np.float32)}


def collate(enc: dict[str, np.ndarray], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to one width (labels padded with IGNORE): a causal LM batch, images in the family's format."""
    width = max(len(s) for s in enc["input_ids"])
    n = len(enc["input_ids"])
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(enc["input_ids"], enc["labels"])):
        ids[i, :len(s)], labels[i, :len(s)], mask[i, :len(s)] = torch.from_numpy(s), torch.from_numpy(lab), 1
    return {"input_ids": ids, "attention_mask": mask, **format_of(enc).collate(enc, ids, image_token_id),
            "labels": labels}


def grounding_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the description tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE)


@torch.no_grad()
def held_out_metrics(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Description loss and next-token accuracy on a fixed set of scenes never trained on."""
    was_training = model.training
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    seen = labels != IGNORE
    loss = F.cross_entropy(logits[seen], labels[seen]).item()
    accuracy = (logits.argmax(-1)[seen] == labels[seen]).float().mean().item()
    model.train(was_training)
    return {"grounding_loss": loss, "grounding_accuracy": accuracy}


def grounding_loop_per_worker(cfg: dict) -> dict:
    """Ray Train entry point of a grounding stage (`cfg["job"]`, a `GroundingJob`). Each rank draws its own scenes
    per step; checkpoints four times, resumes from the latest. Returns held-out metrics (rank 0)."""
    from workers.inference.logits import to_device
    from workers.training.checkpoints import record_attempt, report_checkpoint, resume
    from workers.training.context import RayTrainContext
    from workers.training.optim import adamw, set_lr, update
    from workers.training.step_log import StepLogger

    job: GroundingJob = cfg["job"]
    torch.set_num_threads(max(1, job.threads))
    ctx = RayTrainContext()
    rank, world = ctx.rank, ctx.world
    tc, spec, seed = job.train, job.spec, job.seed
    torch.manual_seed(seed + rank)
    device = ctx.device
    model, processor = load_model_dir(job.model_dir, device=str(device))
    optimizer = adamw(model, tc.lr, tc.weight_decay)
    step = resume(ctx, model, optimizer)
    ddp_model = ctx.prepare(model)
    total, warmup = tc.steps, max(1, int(tc.warmup_ratio * tc.steps))
    every = max(1, total // 4)
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id

    def batch_of(scene_seed: int, n: int) -> dict[str, torch.Tensor]:
        return to_device(collate(encode_scenes(synth.random_scenes(scene_seed, n, spec), processor), pad_id,
                                 image_id), device)

    held_out = batch_of(-1 - seed, 64)  # training seeds are >= 0: these scenes are never trained on
    logger = StepLogger(job.tracking, enabled=rank == 0, progress=job.progress, total=total)
    record_attempt(ctx, logger, step)
    ddp_model.train()
    metrics: dict[str, float] = {}
    while step < total:
        batch = batch_of((seed * total + step) * world + rank, tc.batch_size)
        set_lr(optimizer, tc.lr, step, total, warmup)
        loss = grounding_loss(ddp_model, batch)
        update(loss, model, optimizer, tc.grad_clip)
        step += 1
        logger.log(step, {"loss_grounding": loss.item(), "lr": optimizer.param_groups[0]["lr"]},
                   every=tc.log_every)
        if step % every == 0 or step == total:
            metrics = held_out_metrics(model, held_out) if rank == 0 else {}
            logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, every=1)
            report_checkpoint(ctx, model, optimizer, step, metrics)
    if rank == 0:
        save_model_dir(model, processor, job.out_dir)
    logger.flush()
    return {**(metrics or held_out_metrics(model, held_out)), "steps": step} if rank == 0 else {}
