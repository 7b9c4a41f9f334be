"""The student training loop: one task stage, every kind, in each Ray Train worker (`train_loop_per_worker`) or
in this process (`run_in_process`: the same loop, objective, data order and checkpoints, without Ray Train).

The stage's `StageJob` (`workers.contract`) says what to train and how; the objective is
`workers.training.objectives` (direct, PPOD or TCRD), teacher outputs come through `workers.teachers.requests`
(prefetch, cache, resend; a stage with teachers needs their Ray actor pools either way). What the loop asks of
its runner (rank, device, datasets, checkpoints) it asks a `workers.training.context` context. Rank 0 logs
per-step metrics to the stage's MLflow run (`workers.training.step_log`), evaluates on the validation split (every
`eval_every` steps and at each epoch's end: the learning curve) and writes checkpoints (`workers.training.checkpoints`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import ProcessorMixin

from workers.contract import StageJob
from workers.inference.logits import position_logits, predict, task_metrics, to_device
from workers.models.lora import add_lora
from workers.models.model_dirs import label_word_ids, load_model_dir, save_model_dir
from workers.models.prompts import collate_records, prefixed
from workers.teachers.requests import TeacherRequests
from workers.training.checkpoints import record_attempt, report_checkpoint, resume
from workers.training.context import (
    Batches,
    LocalContext,
    RayTrainContext,
    TrainContext,
)
from workers.training.objectives import StageObjective
from workers.training.optim import adamw, set_lr, update
from workers.training.step_log import StepLogger, Throughput, summed

OnLog = Callable[[int, dict[str, float]], None]  # (step, metrics) as rank 0 logs them (`workers.training.step_log`)


def train_loop_per_worker(cfg: dict) -> dict:
    """Ray Train entry point. `cfg["job"]`: the stage's `StageJob`; `cfg["iterators"]`: a one-worker stage's
    datasets by name (`orchestrator.run.stages`), else absent and read with `ray.train.get_dataset_shard`. Returns
    final validation metrics (rank 0)."""
    return run_stage(cfg["job"], RayTrainContext(cfg.get("iterators")))


def run_in_process(job: StageJob, datasets: dict[str, Batches | dict[str, np.ndarray]], storage: Path,
                   device: str = "cpu", on_log: OnLog | None = None) -> dict:
    """The same stage in this process, without Ray Train: `datasets` by the names the job reads (`job.train_sets`
    and "val"; `workers.training.context.ColumnDataset`s, Ray Datasets or dicts of encoded columns, in stored order),
    checkpoints under `storage` (a second call on the same storage resumes from the latest, as a restart would).
    `on_log(step, values)` gets what MLflow gets (losses per step, `val/*` points), `job.tracking` or not.
    Returns what `train_loop_per_worker` returns. Torch's thread count is the job's during the run (as in a Ray
    worker) and the caller's again after it."""
    threads = torch.get_num_threads()
    try:
        return run_stage(job, LocalContext(datasets, storage, device), on_log)
    finally:
        torch.set_num_threads(threads)


def run_stage(job: StageJob, ctx: TrainContext, on_log: OnLog | None = None) -> dict:
    """Epochs up to the job's step count, a checkpoint after each; rank 0's final metrics."""
    run = StageRun(job, ctx, on_log)
    while run.step < run.total:
        run.train_epoch()
        run.end_epoch()
    return run.finish()


class StageRun:
    """One worker's share of a stage: the student, its optimizer, objective and teacher requests, and the step;
    `ctx` is where it runs (`workers.training.context`)."""

    def __init__(self, job: StageJob, ctx: TrainContext, on_log: OnLog | None = None):
        self.job, tc = job, job.train
        self.ctx = ctx
        torch.set_num_threads(max(1, int(job.threads)))
        self.rank, self.world = ctx.rank, ctx.world
        torch.manual_seed(job.seed + self.rank)
        self.device = ctx.device
        self.model, self.processor = load_model_dir(job.model_dir, dtype=getattr(torch, tc.dtype),
                                                    device=str(self.device), trust_remote_code=job.trust_remote_code)
        if tc.lora:
            self.model = add_lora(self.model, tc.lora)
        self.label_ids = label_word_ids(self.processor.tokenizer)
        self.objective = StageObjective(job.loss, self.label_ids, vocab=len(self.processor.tokenizer),
                                        balance_tasks=tc.balance_tasks)
        self.requests = TeacherRequests(job.loss, self.device)
        self.optimizer = adamw(self.model, tc.lr, tc.weight_decay)
        self.step = resume(ctx, self.model, self.optimizer)
        self.ddp_model = ctx.prepare(self.model)
        self.steps_per_epoch = max(1, job.n_units // (tc.batch_size * self.world))
        self.total = max(1, round(tc.epochs * self.steps_per_epoch))
        self.warmup = max(1, int(tc.warmup_ratio * self.total))
        self.logger = StepLogger(job.tracking, enabled=self.rank == 0, progress=job.progress, total=self.total,
                                 on_log=on_log)
        record_attempt(ctx, self.logger, self.step)  # a restart logs where it picked up
        self.ddp_model.train()
        self.throughput = Throughput(tc.batch_size * self.world)
        self.scored_at, self.val = -1, {}  # the step of rank 0's latest validation metrics, and those

    def train_epoch(self) -> None:
        """Steps up to the end of the current epoch, on that epoch's shard of the training data."""
        tc = self.job.train
        epoch = self.step // self.steps_per_epoch
        epoch_end = min(self.total, (epoch + 1) * self.steps_per_epoch)
        sets = self.job.train_sets
        shard = self.ctx.dataset(sets[min(epoch, len(sets) - 1)])
        raw_batches = shuffled_batches(shard, tc.batch_size, self.job.seed, epoch)
        batches = (self.collate(raw) for raw in itertools.islice(raw_batches, epoch_end - self.step))
        self.throughput.resume()
        for batch, pending in self.requests.with_teacher_outputs(batches):
            self.train_step(batch, pending)

    def collate(self, raw: dict) -> dict:
        """The student's batch of its own encoding, on its device; with `teacher_inputs` (by prefix) when a
        teacher reads its own encoding of the same records (on the CPU: it goes to the wire)."""
        pad_id, image_id = self.processor.tokenizer.pad_token_id, self.model.config.image_token_id
        batch = to_device(collate_records(prefixed(raw, self.job.inputs), pad_id, image_id), self.device)
        own = {t.inputs for t in self.job.loss.teachers if t.inputs is not None}
        if own:
            batch["teacher_inputs"] = {i.prefix: collate_records(prefixed(raw, i.prefix), i.pad_id, i.image_token_id)
                                       for i in own}
        return batch

    def train_step(self, batch: dict, pending: list) -> None:
        """Wait for the batch's teacher outputs, then one optimizer step on the stage's objective."""
        tc = self.job.train
        teacher_out, teacher_wait = self.requests.wait(pending)
        t0 = time.perf_counter()
        set_lr(self.optimizer, tc.lr, self.step, self.total, self.warmup)
        loss, terms = self.objective(position_logits(self.ddp_model, batch), batch["target"], teacher_out,
                                     batch["row_task"])
        update(loss, self.model, self.optimizer, tc.grad_clip)
        self.step += 1
        self.throughput.tick()
        self.logger.log(self.step, {"loss": loss.item(), **terms, "lr": self.optimizer.param_groups[0]["lr"],
                                    "teacher_wait_s": teacher_wait, "student_step_s": time.perf_counter() - t0},
                        every=tc.log_every)
        if tc.eval_every and self.step % tc.eval_every == 0:
            self.validate()

    def end_epoch(self) -> None:
        """Validation metrics (rank 0), flushed to MLflow before the checkpoint every rank reports."""
        metrics = self.validate()
        self.logger.flush()  # every metric up to a checkpoint is in MLflow before the checkpoint exists
        report_checkpoint(self.ctx, self.model, self.optimizer, self.step, metrics)

    def finish(self) -> dict:
        """Teacher counters summed over workers; rank 0 saves the model and returns the final metrics."""
        teacher_stats = summed(self.requests.stats(), self.world, self.device)
        self.logger.log(self.step, teacher_stats, every=1)
        metrics = self.validate()
        if self.rank == 0:
            save_model_dir(self.model, self.processor, self.job.out_dir)  # merges a LoRA adapter in place
        self.logger.flush()
        if self.rank != 0:
            return {}
        return {**metrics, "world_size": self.world, "steps": self.step,
                "train_samples_per_s": self.throughput.rate(), **teacher_stats}

    def validate(self) -> dict[str, float]:
        """Rank 0's validation metrics at the current step, logged as `val/*`; scored once per step (an
        `eval_every` step that ends an epoch, or the last epoch's end and `finish`, share one pass). Other
        ranks: {}. The other workers wait meanwhile at their next gradient all-reduce."""
        if self.rank != 0:
            return {}
        if self.scored_at != self.step:
            self.val = evaluate_rank0(self.model, self.processor, self.label_ids, self.job.train.batch_size,
                                      self.ctx.dataset("val"), self.job.inputs)
            self.scored_at = self.step
            self.logger.log(self.step, {f"val/{k}": v for k, v in self.val.items()}, every=1)
        return self.val


SHUFFLE_ROWS = 1024  # rows a worker shuffles at a time: the whole of a small split, a wide window of a large one


def shuffled_batches(shard: Batches, batch_size: int, seed: int, epoch: int,
                     window: int = SHUFFLE_ROWS) -> Iterator[dict]:
    """One epoch of a worker's training rows in full batches, shuffled anew each epoch from (seed, epoch), window
    by window of the rows in their stored order (interleaved by task, `orchestrator.run.unlabeled.spread`); the
    same (seed, epoch) gives the same batches, so a resumed or repeated stage sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    carry: dict | None = None
    for block in shard.iter_batches(batch_size=window, batch_format="numpy", prefetch_batches=1):
        if carry is not None:
            block = {k: np.concatenate([carry[k], v]) for k, v in block.items()}
        perm = rng.permutation(len(next(iter(block.values()))))
        block = {k: v[perm] for k, v in block.items()}
        full = len(perm) // batch_size * batch_size
        for i in range(0, full, batch_size):
            yield {k: v[i:i + batch_size] for k, v in block.items()}
        carry = {k: v[full:] for k, v in block.items()}


def evaluate_rank0(model: torch.nn.Module, processor: ProcessorMixin, label_ids: tuple[int, int],
                   batch_size: int, val: Batches, inputs: str = "") -> dict[str, float]:
    """Metrics per task on the whole validation split `val` (rank 0 reads it unsplit, the encoding under column
    prefix `inputs`), one entry per supervised position with that position's task."""
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    batches = (to_device(collate_records(prefixed(raw, inputs), pad_id, image_id), model.device)
               for raw in val.iter_batches(batch_size=batch_size * 2, batch_format="numpy"))
    pred = predict(model, batches, label_ids)
    return task_metrics(pred, pred["task"])
