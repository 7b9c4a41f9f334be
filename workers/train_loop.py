"""The student training loop that runs inside each Ray Train worker, and batched prediction.

One loop serves every stage; direct tuning uses cross-entropy on the answer word only. Rank 0 logs
per-step metrics to the stage's MLflow run, evaluates on the validation split, and writes checkpoints.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from workers.lora import ADAPTER_DIR, add_lora, is_lora, load_adapter_weights
from workers.losses import coupling_weights, cross_entropy, topk_forward_kl
from workers.metrics import binary_metrics
from workers.models import HKDProcessor, label_word_ids, load_model_dir, save_model_dir
from workers.prompts import collate, model_inputs

STATE_FILE = "trainer_state.pt"
ATTEMPTS_FILE = "hkd_attempts"  # in a stage's Ray Train storage dir: its attempts started so far
WEIGHTS_FILE = "weights.safetensors"  # a checkpoint's weights, named as the model holds them in memory
FLUSH_S = 1.0  # per-step metrics reach MLflow at least this often (live curves; little lost to a crash)


def answer_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Full-vocabulary logits at the supervised (last prompt) position: [N, V]."""
    return model(**model_inputs(batch), logits_to_keep=1).logits[:, -1].float()


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
    """P(positive) for every unit in the (collated) batches, with uids and targets, in order."""
    was_training = model.training
    model.eval()
    uids, probs, targets = [], [], []
    for batch in batches:
        probs.append(positive_prob(answer_logits(model, batch), label_ids).cpu().numpy())
        uids.extend(batch["uid"])
        targets.append(batch["target"].cpu().numpy())
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
    """Ray Train entry point. `cfg`: model_dir, out_dir, train (TrainConfig dict), loss (see `StageLoss`),
    n_units, threads, seed, tracking {uri, run_id} or None. Returns final validation metrics (rank 0)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(cfg["threads"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"] + rank)
    tc = cfg["train"]
    device = ray.train.torch.get_device()
    model, processor = load_model_dir(cfg["model_dir"], dtype=getattr(torch, tc.get("dtype", "float32")),
                                      device=str(device), trust_remote_code=cfg.get("trust_remote_code", False))
    if tc.get("lora"):
        model = add_lora(model, tc["lora"])
    label_ids = label_word_ids(processor.tokenizer)
    stage_loss = StageLoss(cfg["loss"], label_ids, device, vocab=len(processor.tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc["lr"],
                                  weight_decay=tc["weight_decay"])
    step = _resume(model, optimizer)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    steps_per_epoch = max(1, cfg["n_units"] // (tc["batch_size"] * world))
    total = max(1, round(tc["epochs"] * steps_per_epoch))
    warmup = max(1, int(tc["warmup_ratio"] * total))
    logger = _StepLogger(cfg.get("tracking"), enabled=rank == 0, progress=cfg.get("progress"), total=total)
    _record_attempt(logger, step, rank)
    train_sets = cfg.get("train_sets") or ["train"]  # one per epoch when augmenting
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    ddp_model.train()
    throughput = _Throughput(tc["batch_size"] * world)
    while step < total:
        epoch = step // steps_per_epoch
        epoch_end = min(total, (epoch + 1) * steps_per_epoch)
        shard = ray.train.get_dataset_shard(train_sets[min(epoch, len(train_sets) - 1)])
        raw_batches = shard.iter_batches(batch_size=tc["batch_size"], batch_format="numpy", prefetch_batches=2,
                                         drop_last=True)
        batches = (to_device(collate(raw, pad_id, image_id), device)
                   for raw in itertools.islice(raw_batches, epoch_end - step))
        throughput.resume()
        for batch, pending in stage_loss.with_teacher_outputs(batches):
            teacher_out, teacher_wait = stage_loss.wait(pending)
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = tc["lr"] * lr_at(step, total, warmup)
            loss, terms = stage_loss(answer_logits(ddp_model, batch), batch["target"], teacher_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            optimizer.step()
            step += 1
            throughput.tick()
            logger.log(step, {"loss": loss.item(), **terms, "lr": optimizer.param_groups[0]["lr"],
                              "teacher_wait_s": teacher_wait, "student_step_s": time.perf_counter() - t0},
                       every=tc["log_every"])
        metrics = _evaluate_rank0(model, processor, label_ids, tc["batch_size"]) if rank == 0 else {}
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, every=1)
        logger.flush()  # every metric up to a checkpoint is in MLflow before the checkpoint exists
        _report(model, optimizer, step, metrics, rank)
    teacher_stats = _summed(stage_loss.stats(), world, device)
    logger.log(step, teacher_stats, every=1)
    if rank == 0:
        save_model_dir(model, processor, cfg["out_dir"])  # merges a LoRA adapter in place
    logger.flush()
    if rank != 0:
        return {}
    return {**_evaluate_rank0(model, processor, label_ids, tc["batch_size"]), "world_size": world, "steps": step,
            "train_samples_per_s": throughput.rate(), **teacher_stats}


def _summed(stats: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Counters summed over the workers (each counts only its own shard's batches)."""
    if world == 1 or not stats:
        return stats
    import torch.distributed as dist

    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, values.tolist()))


class _Throughput:
    """Steady-state training samples/s: wall time between consecutive steps (data and teacher waits
    included, evaluation excluded), skipping each epoch's first step, which pays for pipeline start-up."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step, self.seconds, self.steps, self.last = samples_per_step, 0.0, 0, None

    def resume(self) -> None:
        self.last = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.seconds += now - self.last
            self.steps += 1
        self.last = now

    def rate(self) -> float:
        return self.samples_per_step * self.steps / self.seconds if self.seconds else float("nan")


class StageLoss:
    """The stage's objective: ce_weight·CE(ground truth) + Σ_t weight_t·KL_topk(teacher_t ‖ student) at
    temperature T_t, each teacher optionally coupled (per-sample weights from its agreement with the
    ground truth, `losses.coupling_weights`). With no teachers it is plain direct tuning.

    Teacher outputs for batch i+`prefetch` are requested before step i is computed, so teacher latency
    hides behind student compute; each batch carries its own requests, so outputs never cross batches.
    With `cfg["cache"]` ({root, max_bytes}), each teacher's cache is asked first and only the missing rows
    go to the teacher; their answers are stored for later epochs and trials.
    """

    def __init__(self, cfg: dict, label_ids: tuple[int, int], device: torch.device | str = "cpu",
                 vocab: int | None = None):
        self.cfg, self.label_ids, self.device, self.vocab = cfg, label_ids, device, vocab
        self.teachers: list[dict] = cfg.get("teachers") or []
        self.caches: list = []
        self.teacher_calls = self.teacher_units = self.teacher_resends = 0

    def with_teacher_outputs(self, batches: Iterable[dict]) -> Iterator[tuple[dict, list]]:
        """Yield (batch, pending teacher requests) keeping `prefetch` batches in flight ahead."""
        if not self.teachers:
            yield from ((b, []) for b in batches)
            return
        from workers.teacher import TeacherPool

        pools = [TeacherPool.connect(t["name"], t["replicas"]) for t in self.teachers]
        if self.cfg.get("cache") and not self.caches:
            self.caches = [self._open_cache(pool, t["temperature"]) for t, pool in zip(self.teachers, pools)]
        queue: deque = deque()
        for batch in batches:
            queue.append((batch, [self._request(batch, pool, t["temperature"], i)
                                  for i, (t, pool) in enumerate(zip(self.teachers, pools))]))
            if len(queue) > self.cfg.get("prefetch", 1):
                yield queue.popleft()
        yield from queue

    def _open_cache(self, pool, temperature: float):
        import ray

        from workers.teacher_cache import TeacherCache

        fingerprint = ray.get(pool.handles[0].fingerprint.remote())  # hashed once per actor
        return TeacherCache(self.cfg["cache"]["root"], fingerprint, self.cfg["k"], temperature,
                            self.cfg["cache"]["max_bytes"])

    def _request(self, batch: dict, pool, temperature: float, index: int) -> _Request:
        from workers.prompts import select_rows
        from workers.teacher import to_numpy_inputs
        from workers.teacher_cache import unit_key

        cache = self.caches[index] if self.caches else None
        keys = [unit_key(u, a) for u, a in zip(batch["uid"], batch["aug_key"])]
        found = cache.get(keys) if cache else [None] * len(keys)
        missing = [i for i, row in enumerate(found) if row is None]
        send = None
        if missing:
            wire = to_numpy_inputs(batch if len(missing) == len(keys) else select_rows(batch, missing))
            send = functools.partial(pool.submit, wire, self.cfg["k"], temperature)  # again on a teacher crash
            self.teacher_calls += 1
            self.teacher_units += len(missing)
        return _Request(cache, keys, found, missing, send, self.cfg.get("call_retries", 5), self._count_resend)

    def _count_resend(self) -> None:
        self.teacher_resends += 1

    def wait(self, pending: list[_Request]) -> tuple[list[dict], float]:
        if not pending:
            return [], 0.0
        from workers.teacher import from_wire

        t0 = time.perf_counter()
        outs = [to_device(from_wire(r.result()), self.device) for r in pending]
        return outs, time.perf_counter() - t0

    def stats(self) -> dict[str, float]:
        """Teacher calls and rows actually computed, plus the caches' counters summed over teachers."""
        if not self.teachers:
            return {}
        out = {"teacher/calls": float(self.teacher_calls), "teacher/units": float(self.teacher_units),
               "teacher/resends": float(self.teacher_resends)}
        for cache in self.caches:
            for key, value in cache.stats.as_metrics().items():
                out[key] = out.get(key, 0.0) + value
        return out

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 teacher_outs: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = logits[:, :self.vocab]  # the shared tokenizer's rows: real sizes pad their tables differently
        ce = cross_entropy(logits, target_token_ids(targets, self.label_ids))
        loss = self.cfg.get("ce_weight", 1.0) * ce
        terms = {"loss_ce": ce.item()}
        for t, out in zip(self.teachers, teacher_outs):
            tag = t["stage"].replace("+", "_")  # '+' is not valid in an MLflow key
            weights = None
            if t.get("coupled"):
                p_pos = torch.softmax(out["label_logits"], dim=-1)[:, 0]
                weights = coupling_weights(p_pos, targets, sharpness=self.cfg.get("sharpness", 10.0))
                terms[f"coupling_{tag}"] = weights.mean().item()
            kd = topk_forward_kl(logits, out["topk_logprobs"], out["topk_ids"], out["tail_logprob"],
                                 temperature=t["temperature"], weights=weights)
            loss = loss + t["weight"] * kd
            terms[f"loss_kd_{tag}"] = kd.item()
        return loss, terms


class _Request:
    """One teacher's answer for one batch: rows found in the cache plus a teacher call for the misses.

    Ray retries a call whose replica dies (`max_task_retries`), but a replica killed again while the call is
    queued, or one that is restarting, can still fail it with a `RayActorError`. The call is then sent again,
    to whichever replica is least busy, after a growing pause (1, 2, 4 … 30 s), up to `retries` times: teacher
    crashes cost seconds inside the worker instead of a Ray Train worker failure (`max_failures`).
    """

    def __init__(self, cache, keys: list[str], found: list, missing: list[int], send, retries: int, on_resend):
        self.cache, self.keys, self.found, self.missing = cache, keys, found, missing
        self.send, self.retries, self.on_resend = send, retries, on_resend
        self.ref = send() if send is not None else None

    def result(self) -> dict[str, np.ndarray]:
        from workers.teacher_cache import merge

        fresh = self._fetch() if self.ref is not None else None
        if self.cache is None:
            return fresh
        if fresh is not None:
            self.cache.put([self.keys[i] for i in self.missing], fresh)
        return merge(self.found, fresh)

    def _fetch(self) -> dict[str, np.ndarray]:
        import ray
        from ray.exceptions import RayActorError

        for attempt in itertools.count():
            try:
                return ray.get(self.ref)
            except RayActorError as err:
                if attempt >= self.retries:
                    raise RuntimeError(f"teacher call failed {attempt + 1} times (teachers.call_retries="
                                       f"{self.retries}); its replicas are gone: {err}") from err
                time.sleep(min(2.0 ** attempt, 30.0))
                self.ref = self.send()
                self.on_resend()


def _evaluate_rank0(model: torch.nn.Module, processor: HKDProcessor, label_ids: tuple[int, int],
                    batch_size: int) -> dict[str, float]:
    import ray.train

    val = ray.train.get_dataset_shard("val")
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    tasks, batches = [], []
    for raw in val.iter_batches(batch_size=batch_size * 2, batch_format="numpy"):
        tasks.append(raw["task"])
        batches.append(to_device(collate(raw, pad_id, image_id), model.device))
    return task_metrics(predict(model, batches, label_ids), np.concatenate(tasks))


def _report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, metrics: dict,
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


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and step from the latest Ray Train checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        return load_train_state(model, optimizer, Path(d))


def _record_attempt(logger: _StepLogger, step: int, rank: int) -> None:
    """Rank 0 counts this attempt; every restart logs `resumed_from_step`: the step of the checkpoint it loaded,
    0 when it starts from scratch. A restart is not always a resume: a reported checkpoint counts only once the
    controller has polled the worker and registered it (`ray.train.get_checkpoint()` returns the latest one
    registered), so a worker killed between its report and that poll leaves none, or only an older one."""
    if rank == 0 and (_attempts_before() or step):
        logger.log(step, {"resumed_from_step": step}, every=1)


def _attempts_before() -> int:
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


class _StepLogger:
    """Buffers per-step metrics and sends them to the stage's MLflow run in batches (rank 0 only), at
    least every `FLUSH_S` seconds and before each checkpoint."""

    def __init__(self, tracking: dict | None, enabled: bool, progress: str | None = None, total: int = 0):
        self.client = None
        self.buffer: list = []
        # The driver's step bar polls this file (orchestrator/progress.py): rank 0 writes it twice a second.
        self.progress = Path(progress) if enabled and progress else None
        self.total, self.last_write = total, 0.0
        self.flushed_at = time.monotonic()
        if enabled and tracking:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def log(self, step: int, values: dict[str, float], every: int) -> None:
        if self.progress and (time.monotonic() - self.last_write > 0.5 or step == self.total):
            self.last_write = time.monotonic()
            tmp = self.progress.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "total": self.total}))
            tmp.replace(self.progress)
        if self.client is None or step % every:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in values.items())
        if len(self.buffer) >= 200 or time.monotonic() - self.flushed_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []
        self.flushed_at = time.monotonic()
