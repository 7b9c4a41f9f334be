"""Frozen teachers as Ray actors that answer with top-k log-probs, never full-vocabulary logits.

A teacher replica loads one model dir once and serves `infer` calls from the driver or from Ray Train
workers (which find replicas by name with `TeacherPool.connect`). Only the supervised (last prompt)
position crosses the wire, as the `workers.losses.teacher_topk` format plus the two label-word logits:
a few hundred bytes per unit instead of 4·V (≈600 kB for Qwen's vocabulary).

Replicas restart when their process dies (`max_restarts`) and calls in flight or queued meanwhile are
retried (`max_task_retries`), so a crashed teacher costs a model reload, not the training run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import ray
import torch

from workers.inference.logits import position_logits
from workers.models.families import load_processor
from workers.models.model_dirs import (
    check_same_tokenizer,
    count_parameters,
    label_word_ids,
    load_model_dir,
)
from workers.models.prompts import model_inputs
from workers.teachers.outputs import wire_outputs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HASH_CHUNK = 1 << 20


def to_numpy_inputs(batch: dict, pixel_dtype: np.dtype | None = np.float16) -> dict[str, np.ndarray]:
    """Model inputs of a collated record batch and its supervised `positions` ([P, 2] (row, column)) as
    numpy, for the wire.

    Pixels go as fp16 by default, halving the largest input: lossless for batches from
    `workers.models.prompts.encode_records`, which already stores pixels as fp16 (collate_records only upcasts them).
    Pass `pixel_dtype=None` to send them unchanged.
    """
    tensors = {**model_inputs(batch), "positions": batch["positions"]}
    out = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    if pixel_dtype is not None:
        out["pixel_values"] = out["pixel_values"].astype(pixel_dtype)
    return out


def dir_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files (names and contents, in name order).

    Identifies exactly which teacher produced cached outputs; reading the weights once is far cheaper
    than the forward passes they serve.
    """
    root = Path(model_dir)
    files = [root / "config.json"] + sorted(p for p in root.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def check_compatible(teacher_dir: str | Path, student_dir: str | Path) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (loads only the processors)."""
    check_same_tokenizer(load_processor(teacher_dir).tokenizer,
                         load_processor(student_dir).tokenizer,
                         f"teacher {teacher_dir}", f"student {student_dir}")


class Teacher:
    """One frozen teacher replica (wrapped with `ray.remote` by `TeacherPool`)."""

    def __init__(self, model_dir: str | Path, threads: int = 1, trust_remote_code: bool = False):
        # Ray sets OMP_NUM_THREADS=1 in actors: without this torch ignores the CPUs the actor reserved.
        torch.set_num_threads(max(1, int(threads)))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model_dir = str(model_dir)
        self.model, processor = load_model_dir(model_dir, dtype=dtype, device=self.device,
                                               trust_remote_code=trust_remote_code)
        self.model.eval().requires_grad_(False)
        self.vocab = len(processor.tokenizer)
        self.label_ids = label_word_ids(processor.tokenizer)
        # batches and supervised positions answered (forwards a cache saved are absent)
        self.served = self.served_units = 0
        self._fingerprint: str | None = None

    @torch.inference_mode()
    def infer(self, batch: dict[str, np.ndarray], k: int, temperature: float) -> dict[str, np.ndarray]:
        """Top-k log-probs, ids and tail at `temperature`, plus raw label-word logits, at every supervised
        position of the batch ([P, …], in the order of `batch["positions"]`)."""
        inputs = {}
        for key, value in batch.items():
            tensor = torch.tensor(value, device=self.device)  # copies: the arrays Ray hands us are read-only
            inputs[key] = tensor.to(self.model.dtype) if tensor.is_floating_point() else tensor
        logits = position_logits(self.model, inputs)[:, :self.vocab]  # the forward the student trains through
        out = wire_outputs(logits, self.label_ids, k, temperature)
        self.served += 1
        self.served_units += logits.shape[0]
        return out

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = dir_fingerprint(self.model_dir)
        return self._fingerprint

    def info(self) -> dict:
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "model_dir": self.model_dir, "vocab": self.vocab, "label_ids": self.label_ids,
            "params": count_parameters(self.model), "device": self.device, "threads": torch.get_num_threads(),
            "pid": os.getpid(), "served": self.served, "served_units": self.served_units,
            "node_id": ctx.get_node_id() if ctx else None,
            "restarted": bool(ctx and ctx.get_actor_id() and ctx.was_current_actor_reconstructed),
        }


def actor_name(name: str, index: int) -> str:
    return f"hkd-teacher-{name}-{index}"


class TeacherPool:
    """Handles to a pool's replicas, spreading calls to the replica with the fewest calls in flight; `name`: the
    pool's, by which train workers `connect` to it."""

    def __init__(self, handles: list, name: str = ""):
        if not handles:
            raise ValueError("a teacher pool needs at least one replica")
        self.handles, self.name = handles, name
        self.sent = [0] * len(handles)
        self._in_flight: list[list[ray.ObjectRef]] = [[] for _ in handles]

    @classmethod
    def start(cls, name: str, model_dir: str | Path, replicas: int = 1, num_cpus: float = 1.0,
              num_gpus: float = 0.0, threads: int | None = None, max_restarts: int = 3,
              max_task_retries: int = 3, namespace: str = "hkd",
              student_dir: str | Path | None = None, resources: dict[str, float] | None = None,
              trust_remote_code: bool = False, runtime_env: dict | None = None) -> TeacherPool:
        """Start (or reuse, if already live) `replicas` named actors owned by this driver.

        `threads` defaults to the CPU share; `student_dir`, when given, is checked for a shared tokenizer
        before anything starts; `resources` (custom Ray resources per replica) pins replicas to teacher nodes;
        `runtime_env`: the replicas' (`orchestrator.cluster.warm_workers.teacher_runtime_env`).
        """
        if student_dir is not None:
            check_compatible(model_dir, student_dir)
        threads = max(1, int(num_cpus)) if threads is None else threads
        actor_cls = ray.remote(Teacher)
        handles = [
            actor_cls.options(name=actor_name(name, i), namespace=namespace, get_if_exists=True,
                              num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                              max_restarts=max_restarts, runtime_env=runtime_env,
                              max_task_retries=max_task_retries).remote(str(model_dir), threads, trust_remote_code)
            for i in range(replicas)
        ]
        return cls(handles, name)

    @classmethod
    def connect(cls, name: str, replicas: int, namespace: str = "hkd") -> TeacherPool:
        """Handles to a running pool by name (from Ray Train workers or any other task)."""
        return cls([ray.get_actor(actor_name(name, i), namespace=namespace) for i in range(replicas)], name)

    def submit(self, batch: dict[str, np.ndarray], k: int, temperature: float) -> ray.ObjectRef:
        """Send one batch to the least-busy replica (ties rotate); returns the ref to the wire outputs."""
        for i, refs in enumerate(self._in_flight):
            if refs:
                _, self._in_flight[i] = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        start = sum(self.sent) % len(self.handles)
        order = sorted(range(len(self.handles)),
                       key=lambda i: (len(self._in_flight[i]), (i - start) % len(self.handles)))
        i = order[0]
        ref = self.handles[i].infer.remote(batch, k, temperature)
        self._in_flight[i].append(ref)
        self.sent[i] += 1
        return ref

    def info(self) -> list[dict]:
        return ray.get([h.info.remote() for h in self.handles])

    def restarts(self) -> int:
        """How often the pool's replica processes were restarted, as Ray's control store (GCS) counts it
        (Ray's public state API needs the dashboard, which local runs leave off)."""
        from ray._private import state

        return sum(int(state.actors(h._actor_id.hex())["NumRestarts"]) for h in self.handles)

    def shutdown(self) -> None:
        """Kill the replicas for good (no restart)."""
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self.handles, self.sent, self._in_flight = [], [], []
