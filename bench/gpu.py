"""One-shot GPU benchmark of the distillation stack at real Qwen2.5-VL shapes (random init, nothing downloaded).

Parts (each optional, each guarded: a failure is recorded in the JSON and the next part runs):

  teacher  7B-shape teacher forward (logits_to_keep=1) + `teacher_topk`, in-process: samples/s, MFU
  student  3B-shape student, full fine-tune step (CE + `topk_forward_kl` vs precomputed teacher top-k,
           AdamW fused, bf16 params): samples/s, MFU
  lora     the same student with LoRA r=16 on the text model's q/k/v/o: samples/s, MFU
  actor    the teacher inside a Ray actor (num_gpus=0.5) answering in the wire format: samples/s
  e2e      teacher actor + student in a Ray Train TorchTrainer worker (num_gpus=0.5) with the next batch's
           teacher outputs prefetched (`workers.train_loop.StageLoss` when importable): samples/s and its
           ratio to the in-process bounds 1/(1/teacher + 1/student) (sequential) and min(teacher, student)
           (perfect overlap)

Every sample is one 448x448 image (grid_thw [1, 32, 32]: 1024 patches → 256 merged image tokens) plus 64
text tokens, synthesized directly as input_ids / pixel_values (no tokenizer, no processor).

    python bench/gpu.py                       # everything, GPU, defaults below
    python bench/gpu.py --tiny                # tiny shapes on CPU: a dry run of every code path
    python bench/gpu.py --parts teacher,student --steps 3 --batch 8

Prints progress lines and a table; writes JSON to $OUT/gpu.json when $OUT is set (or --json PATH), rewritten
after every part so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Ray actors and train workers inherit the environment of the raylet this process starts: make `workers`
# importable there without an installed package.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)])

import numpy as np  # noqa: E402
import torch  # noqa: E402

ALL_PARTS = ("teacher", "student", "lora", "actor", "e2e")
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu-bench {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A Qwen2.5-VL text decoder + vision tower (the real checkpoints' config.json values)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    v_depth: int = 32
    v_hidden: int = 1280
    v_heads: int = 16
    v_intermediate: int = 3420
    fullatt: tuple = (7, 15, 23, 31)
    window: int = 112
    rope_theta: float = 1_000_000.0


TEACHER_7B = Shape("qwen2.5-vl-7b", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                   vocab=152_064, tie=False)
STUDENT_3B = Shape("qwen2.5-vl-3b", hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008,
                   vocab=151_936, tie=True)
TINY_TEACHER = Shape("tiny-teacher", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024,
                     tie=False, v_depth=2, v_hidden=32, v_heads=2, v_intermediate=64, fullatt=(1,))
TINY_STUDENT = Shape("tiny-student", hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=1024,
                     tie=True, v_depth=2, v_hidden=32, v_heads=2, v_intermediate=64, fullatt=(1,))

PATCH, MERGE, TEMPORAL = 14, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH  # 1176 values per pixel_values row


def special_ids(shape: Shape) -> dict[str, int]:
    """Qwen's special-token ids (151643 + offset at real sizes; the same layout near the top of a tiny vocab)."""
    base = 151_643 if shape.vocab > 150_000 else shape.vocab - 24
    names = ["endoftext", "im_start", "im_end", "object_ref_start", "object_ref_end", "box_start", "box_end",
             "quad_start", "quad_end", "vision_start", "vision_end", "vision_pad", "image_pad", "video_pad"]
    ids = {n: base + i for i, n in enumerate(names)}
    # "user", "assistant", "\n", "yes", "no" in Qwen's tokenizer; small stand-ins in a tiny vocab.
    ids.update({"user": 872, "assistant": 77091, "nl": 198, "yes": 9693, "no": 2152} if base > 150_000 else
               {"user": 10, "assistant": 11, "nl": 12, "yes": 13, "no": 14})
    ids["text_vocab"] = base
    return ids


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]  # 128 → [16, 24, 24], Qwen's own split


def make_config(shape: Shape):
    import transformers
    from transformers import Qwen2_5_VLConfig

    ids = special_ids(shape)
    text = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32_768, rms_norm_eps=1e-6, hidden_act="silu", use_cache=False,
        bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"],
        tie_word_embeddings=shape.tie,
    )
    mrope = _mrope_section(shape.hidden // shape.heads)
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": shape.rope_theta, "mrope_section": mrope}
    else:
        text["rope_theta"] = shape.rope_theta
        text["rope_scaling"] = {"type": "mrope", "mrope_section": mrope}
    vision = dict(
        depth=shape.v_depth, hidden_size=shape.v_hidden, intermediate_size=shape.v_intermediate,
        num_heads=shape.v_heads, out_hidden_size=shape.hidden, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL, window_size=shape.window, fullatt_block_indexes=list(shape.fullatt),
        hidden_act="silu",
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=shape.tie,
    )


def build_model(shape: Shape, device: str, dtype: torch.dtype, attn: str = "sdpa", seed: int = 0):
    """Random-init Qwen2_5_VLForConditionalGeneration built directly on `device` in `dtype`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = make_config(shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
            except TypeError:  # transformers 4.x spelling
                model = Qwen2_5_VLForConditionalGeneration._from_config(config, torch_dtype=dtype,
                                                                        attn_implementation=attn)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def forward_takes_mm_token_type_ids() -> bool:
    import inspect

    from transformers import Qwen2_5_VLForConditionalGeneration

    return "mm_token_type_ids" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters


# --------------------------------------------------------------------------------------------- inputs


def make_batch(shape: Shape, batch: int, image_px: int, text_len: int, seed: int, mm_types: bool) -> dict:
    """A collated CPU batch like `workers.prompts.collate` makes: one image + `text_len` other tokens per row.

    Row layout: <im_start>user\\n<vision_start> <image_pad>×N <vision_end> body… <im_end>\\n<im_start>assistant\\n
    """
    grid = image_px // PATCH
    if grid % MERGE or grid < MERGE:
        raise ValueError(f"image {image_px}px: {grid} patches per side, must be a positive multiple of {MERGE}")
    patches = grid * grid
    n_image = patches // (MERGE * MERGE)
    ids = special_ids(shape)
    prefix = [ids["im_start"], ids["user"], ids["nl"], ids["vision_start"]]
    suffix = [ids["im_end"], ids["nl"], ids["im_start"], ids["assistant"], ids["nl"]]
    n_body = text_len - len(prefix) - 1 - len(suffix)
    if n_body < 1:
        raise ValueError(f"--text {text_len} is too short (needs > {len(prefix) + 1 + len(suffix)})")
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(100, ids["text_vocab"] - 1, (batch, n_body), generator=g)
    fixed = lambda xs: torch.tensor(xs, dtype=torch.long).expand(batch, -1)  # noqa: E731
    input_ids = torch.cat([fixed(prefix), fixed([ids["image_pad"]] * n_image), fixed([ids["vision_end"]]), body,
                           fixed(suffix)], dim=1).contiguous()
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch * patches, PATCH_DIM, generator=g),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, dtype=torch.long),
        "target": torch.randint(0, 2, (batch,), generator=g),
        "uid": [f"bench-{seed}-{i}" for i in range(batch)],
    }
    if mm_types:
        out["mm_token_type_ids"] = (input_ids == ids["image_pad"]).int()
    return out


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def to_model(batch: dict, device, dtype: torch.dtype) -> dict:
    out = {}
    for k in MODEL_KEYS:
        if k in batch:
            v = torch.as_tensor(batch[k])
            v = v.to(device, non_blocking=True)
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def answer_logits(model, inputs: dict) -> torch.Tensor:
    """As `workers.train_loop.answer_logits` (+ use_cache=False): [N, V] fp32 logits at the last position."""
    return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].float()


def wire_outputs(logits: torch.Tensor, label_ids: tuple[int, int], k: int, temperature: float) -> dict:
    """`workers.teacher.wire_outputs` (top-k log-probs fp16, ids int32, tail fp16, 2 label logits fp32)."""
    from workers.losses import teacher_topk

    lp, ids, tail = teacher_topk(logits, k, temperature)
    return {"topk_logprobs": lp.cpu().numpy(), "topk_ids": ids.cpu().numpy(), "tail_logprob": tail.cpu().numpy(),
            "label_logits": logits[:, list(label_ids)].float().cpu().numpy()}


# --------------------------------------------------------------------------------------------- FLOPs


def count_params(model) -> dict[str, int]:
    groups = {"embed": 0, "lm_head": 0, "text": 0, "v_patch": 0, "v_blocks": 0, "v_merger": 0, "lora": 0,
              "trainable": 0, "total": 0}
    for name, p in model.named_parameters():  # tied weights appear once
        n = p.numel()
        groups["total"] += n
        groups["trainable"] += n if p.requires_grad else 0
        if "lora_" in name:
            groups["lora"] += n
        elif "visual" in name:
            groups["v_merger" if "merger" in name else "v_patch" if "patch_embed" in name else "v_blocks"] += n
        elif "embed_tokens" in name:
            groups["embed"] += n
        elif "lm_head" in name:
            groups["lm_head"] += n
        else:
            groups["text"] += n
    return groups


FLOPS_FORMULA = (
    "FLOPs per sample = m*N_text*L + a*4*d*L^2*layers (text attention) + m*d*V (lm_head at 1 position: "
    "logits_to_keep=1) + m_v*(N_patch_embed + N_vision_blocks)*P + m_v*N_merger*P/4 "
    "+ a_v*4*d_v*P*(n_full*P + n_windowed*W) (vision attention). N_text = decoder params without "
    "embed_tokens/lm_head; L = image tokens + text tokens (256 + 64); P = patches per image (1024); W = patches "
    "per 112 px window (64). Forward: m=m_v=2, a=a_v=1. Full training: m=m_v=6, a=a_v=3. LoRA: m=4 (frozen "
    "weights: forward + activation grads), a=3, vision frozen and not backpropagated m_v=2, a_v=1. Attention "
    "counted without causal halving. MFU = FLOPs/sample * samples/s / peak (989 TFLOP/s bf16 dense, H100/H200)."
)


def flops_per_sample(shape: Shape, params: dict[str, int], seq: int, patches: int, mode: str) -> float:
    """Model FLOPs of one sample (see FLOPS_FORMULA). mode: forward | lora | full."""
    m_text = {"forward": 2, "lora": 4, "full": 6}[mode]
    m_vis = {"forward": 2, "lora": 2, "full": 6}[mode]
    a_text = 1 if mode == "forward" else 3
    a_vis = 3 if mode == "full" else 1
    text = m_text * params["text"] * seq + a_text * 4 * shape.hidden * seq * seq * shape.layers
    head = m_text * shape.hidden * shape.vocab
    window_patches = min(patches, (shape.window // PATCH) ** 2)
    n_full = len(shape.fullatt)
    vis_attn = 4 * shape.v_hidden * patches * (n_full * patches + (shape.v_depth - n_full) * window_patches)
    vision = (m_vis * (params["v_patch"] + params["v_blocks"]) * patches + m_vis * params["v_merger"] * patches / 4
              + a_vis * vis_attn)
    return float(text + head + vision)


# --------------------------------------------------------------------------------------------- helpers


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_steps(fn, warmup: int, steps: int, device) -> list[float]:
    """Per-step seconds of `steps` calls after `warmup` untimed ones (synchronized around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def peak_gb(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def make_optimizer(params, lr: float = 1e-5):
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True), "AdamW(fused=True)"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True), "AdamW(foreach=True)"


def rates(times: list[float], batch: int) -> dict:
    mean = sum(times) / len(times)
    return {"step_s_mean": round(mean, 4), "step_s_median": round(sorted(times)[len(times) // 2], 4),
            "step_s_all": [round(t, 4) for t in times], "samples_per_s": round(batch / mean, 3)}


def mfu(flops_sample: float, samples_per_s: float, peak_tflops: float | None) -> dict:
    tflops = flops_sample * samples_per_s / 1e12
    return {"tflops_per_sample": round(flops_sample / 1e12, 4), "achieved_tflops": round(tflops, 2),
            "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None}


class Ctx:
    """What every part needs: shapes, sizes, device, and the shared JSON record."""

    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.teacher_shape = TINY_TEACHER if args.tiny else TEACHER_7B
        self.student_shape = TINY_STUDENT if args.tiny else STUDENT_3B
        self.mm_types = forward_takes_mm_token_type_ids()
        grid = args.image // PATCH
        self.patches = grid * grid
        self.seq = self.patches // (MERGE * MERGE) + args.text
        ids = special_ids(self.student_shape)
        self.label_ids = (ids["yes"], ids["no"])
        self.peak = args.peak_tflops if self.cuda else None
        self.record: dict = {"meta": {}, "parts": {}, "summary": {}}

    def batch(self, seed: int, shape: Shape | None = None) -> dict:
        a = self.args
        return make_batch(shape or self.student_shape, a.batch, a.image, a.text, seed, self.mm_types)

    def save(self) -> None:
        path = self.args.json or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(path) + ".tmp")
            tmp.write_text(json.dumps(self.record, indent=2, default=str))
            tmp.replace(path)

    def remaining(self) -> float:
        return self.args.budget - (time.perf_counter() - T0)


# --------------------------------------------------------------------------------------------- parts


def part_teacher(ctx: Ctx) -> dict:
    from workers.losses import teacher_topk

    a, shape = ctx.args, ctx.teacher_shape
    t = time.perf_counter()
    model = build_model(shape, ctx.device, ctx.dtype, a.attn).eval().requires_grad_(False)
    build_s = time.perf_counter() - t
    log(f"teacher {shape.name} built in {build_s:.1f}s")
    inputs = to_model(ctx.batch(0, shape), ctx.device, ctx.dtype)
    reset_peak(ctx.device)

    @torch.inference_mode()
    def step():
        logits = answer_logits(model, inputs)
        lp, ids, tail = teacher_topk(logits, a.k, a.temperature)
        return lp, ids, tail, logits[:, list(ctx.label_ids)]

    times = timed_steps(step, a.warmup, a.steps, ctx.device)
    with torch.inference_mode():
        logits = answer_logits(model, inputs)
        topk_times = timed_steps(lambda: teacher_topk(logits, a.k, a.temperature), 2, 10, ctx.device)
        finite = bool(torch.isfinite(logits).all())
    params = count_params(model)
    out = {"shape": asdict(shape), "params": params, "build_s": round(build_s, 1), "peak_gb": peak_gb(ctx.device),
           "inputs_on_device": True, "logits_finite": finite,
           "topk_ms": round(1000 * sum(topk_times) / len(topk_times), 3), **rates(times, a.batch)}
    out.update(mfu(flops_per_sample(shape, params, ctx.seq, ctx.patches, "forward"), out["samples_per_s"], ctx.peak))
    del model, inputs, logits
    free(ctx.device)
    return out


def _student_run(ctx: Ctx, lora: bool) -> dict:
    from workers.losses import cross_entropy, teacher_topk, topk_forward_kl

    a, shape = ctx.args, ctx.student_shape
    t = time.perf_counter()
    model = build_model(shape, ctx.device, ctx.dtype, a.attn, seed=1)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # vision uses qkv/proj: text only
        model = get_peft_model(model, cfg)
    grad_ckpt = bool(a.grad_ckpt)
    if grad_ckpt:
        _enable_ckpt(model, lora)
    model.train()
    opt, opt_name = make_optimizer(model.parameters())
    build_s = time.perf_counter() - t
    log(f"{'lora' if lora else 'full'} student {shape.name} built in {build_s:.1f}s (grad_ckpt={grad_ckpt})")
    batch = ctx.batch(1)
    inputs = to_model(batch, ctx.device, ctx.dtype)
    targets = torch.where(batch["target"] == 1, ctx.label_ids[0], ctx.label_ids[1]).to(ctx.device)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    teacher_logits = torch.randn(a.batch, shape.vocab, device=ctx.device, generator=g) * 3
    lp, ids, tail = teacher_topk(teacher_logits, a.k, a.temperature)  # "precomputed" teacher outputs
    losses = []

    def step():
        logits = answer_logits(model, inputs)
        loss = cross_entropy(logits, targets) + topk_forward_kl(logits, lp, ids, tail, temperature=a.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.detach())

    reset_peak(ctx.device)
    auto_ckpt = False
    if ctx.cuda and not grad_ckpt:
        oom = False
        try:
            step()
            sync(ctx.device)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block so the failed step's tensors are gone
            log("OOM without gradient checkpointing: retrying with it")
            opt.zero_grad(set_to_none=True)
            free(ctx.device)
            _enable_ckpt(model, lora)
            grad_ckpt = auto_ckpt = True
            reset_peak(ctx.device)
    times = timed_steps(step, a.warmup, a.steps, ctx.device)
    params = count_params(model)
    out = {"shape": asdict(shape), "params": params, "build_s": round(build_s, 1), "peak_gb": peak_gb(ctx.device),
           "grad_ckpt": grad_ckpt, "grad_ckpt_auto_after_oom": auto_ckpt, "optimizer": opt_name,
           "param_dtype": str(ctx.dtype), "attn": a.attn, "loss": "CE + topk_forward_kl(k=%d, T=%g)" % (a.k, a.temperature),
           "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)],
           **rates(times, a.batch)}
    if lora:
        out["lora"] = {"r": a.lora_r, "alpha": 2 * a.lora_r, "targets": "q_proj,k_proj,v_proj,o_proj (text)"}
    out.update(mfu(flops_per_sample(shape, params, ctx.seq, ctx.patches, "lora" if lora else "full"),
                   out["samples_per_s"], ctx.peak))
    del model, opt, inputs, losses, lp, ids, tail, teacher_logits
    free(ctx.device)
    return out


def _enable_ckpt(model, lora: bool) -> None:
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    model.gradient_checkpointing_enable(**kwargs)
    if lora and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def part_student(ctx: Ctx) -> dict:
    return _student_run(ctx, lora=False)


def part_lora(ctx: Ctx) -> dict:
    return _student_run(ctx, lora=True)


# ---- Ray parts


class BenchTeacher:
    """A teacher replica like `workers.teacher.Teacher`, but built from a config (no model dir); same `infer`."""

    def __init__(self, shape: dict, attn: str, threads: int, label_ids: tuple[int, int], tiny: bool):
        torch.set_num_threads(max(1, int(threads)))
        t = time.perf_counter()
        self.device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        shape = dict(shape, fullatt=tuple(shape["fullatt"]))
        self.model = build_model(Shape(**shape), self.device, self.dtype, attn).eval().requires_grad_(False)
        self.label_ids = tuple(label_ids)
        # Only rows a student shares: the 7B pads its table to 152,064 rows, the 3B to 151,936 (the real
        # tokenizer has 151,665); ids beyond the student's table would index out of range in the KD.
        self.shared_vocab = min(TEACHER_7B.vocab, STUDENT_3B.vocab) if not tiny else None
        self.build_s = time.perf_counter() - t
        self.served = 0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": self.device, "build_s": round(self.build_s, 1),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(),
                "gpu_gb": round(torch.cuda.memory_allocated() / 2**30, 2) if self.device == "cuda" else None}

    @torch.inference_mode()
    def infer(self, batch: dict, k: int, temperature: float) -> dict:
        inputs = {}
        for key, value in batch.items():
            tensor = torch.tensor(value, device=self.device)  # copies: the arrays Ray hands us are read-only
            inputs[key] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        logits = answer_logits(self.model, inputs)[:, :self.shared_vocab]
        out = wire_outputs(logits, self.label_ids, k, temperature)
        self.served += 1
        return out


def to_wire_inputs(batch: dict) -> dict:
    """`workers.teacher.to_numpy_inputs`: model inputs as numpy, pixels as fp16."""
    out = {k: torch.as_tensor(batch[k]).cpu().numpy() for k in MODEL_KEYS if k in batch}
    out["pixel_values"] = out["pixel_values"].astype(np.float16)
    return out


TEACHER_NAME = "bench"  # actor "hkd-teacher-bench-0" in namespace "hkd": what TeacherPool.connect finds


def ensure_ray(ctx: Ctx):
    import ray

    if not ray.is_initialized():
        cpus = max(os.cpu_count() or 1, 4) + 1
        gpus = torch.cuda.device_count() if ctx.cuda else 0
        t = time.perf_counter()
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=True,
                 namespace="hkd", configure_logging=True, logging_level="warning")
        ctx.record["meta"]["ray_init_s"] = round(time.perf_counter() - t, 1)
        ctx.record["meta"]["ray_resources"] = ray.cluster_resources()
        log(f"ray up in {time.perf_counter() - t:.1f}s: {ray.cluster_resources()}")
    return ray


def ensure_actor(ctx: Ctx):
    if getattr(ctx, "actor", None) is not None:
        return ctx.actor
    ray = ensure_ray(ctx)
    a = ctx.args
    cls = ray.remote(BenchTeacher)
    t = time.perf_counter()
    actor = cls.options(name=f"hkd-teacher-{TEACHER_NAME}-0", namespace="hkd", num_cpus=a.actor_cpus,
                        num_gpus=0.5 if ctx.cuda else 0, max_restarts=0).remote(
        asdict(ctx.teacher_shape), a.attn, a.actor_cpus, ctx.label_ids, ctx.tiny)
    info = ray.get(actor.ready.remote(), timeout=max(60.0, min(300.0, ctx.remaining())))
    info["start_s"] = round(time.perf_counter() - t, 1)
    log(f"teacher actor ready in {info['start_s']}s: {info}")
    ctx.actor, ctx.actor_info = actor, info
    return actor


def part_actor(ctx: Ctx) -> dict:
    import ray

    a = ctx.args
    actor = ensure_actor(ctx)
    wires = [to_wire_inputs(ctx.batch(100 + i, ctx.teacher_shape)) for i in range(min(3, a.steps))]
    nbytes_in = sum(v.nbytes for v in wires[0].values())
    timeout = max(60.0, ctx.remaining())
    for i in range(a.warmup):
        ray.get(actor.infer.remote(wires[i % len(wires)], a.k, a.temperature), timeout=timeout)
    # Latency: one request at a time (what a step waits for with no prefetch).
    lat = []
    for i in range(2):
        t = time.perf_counter()
        out = ray.get(actor.infer.remote(wires[i % len(wires)], a.k, a.temperature), timeout=timeout)
        lat.append(time.perf_counter() - t)
    # Throughput: all requests queued at once (the actor serves them back to back).
    t = time.perf_counter()
    refs = [actor.infer.remote(wires[i % len(wires)], a.k, a.temperature) for i in range(a.steps)]
    outs = ray.get(refs, timeout=timeout)
    elapsed = time.perf_counter() - t
    nbytes_out = sum(v.nbytes for v in outs[0].values())
    return {"actor": ctx.actor_info, "num_gpus": 0.5 if ctx.cuda else 0, "num_cpus": a.actor_cpus,
            "latency_s": [round(x, 4) for x in lat], "step_s_mean": round(elapsed / a.steps, 4),
            "samples_per_s": round(a.steps * a.batch / elapsed, 3), "request_bytes": int(nbytes_in),
            "reply_bytes": int(nbytes_out), "reply_bytes_per_sample": round(nbytes_out / a.batch, 1),
            "reply_keys": {k: [list(v.shape), str(v.dtype)] for k, v in out.items()}}


class LocalStageLoss:
    """Fallback with `workers.train_loop.StageLoss`'s interface (one teacher, no coupling) for when it cannot
    be imported (e.g. PIL missing on the device image)."""

    def __init__(self, cfg: dict, label_ids: tuple[int, int]):
        import ray

        self.cfg, self.label_ids = cfg, label_ids
        t = cfg["teachers"][0]
        self.teacher = t
        self.handle = ray.get_actor(f"hkd-teacher-{t['name']}-0", namespace="hkd")

    def with_teacher_outputs(self, batches):
        from collections import deque

        queue = deque()
        for batch in batches:
            ref = self.handle.infer.remote(to_wire_inputs(batch), self.cfg["k"], self.teacher["temperature"])
            queue.append((batch, [ref]))
            if len(queue) > self.cfg.get("prefetch", 1):
                yield queue.popleft()
        yield from queue

    def wait(self, pending):
        import ray

        t = time.perf_counter()
        outs = [{k: torch.from_numpy(np.array(v, copy=True)) for k, v in o.items()} for o in ray.get(pending)]
        return outs, time.perf_counter() - t

    def __call__(self, logits, targets, teacher_outs):
        from workers.losses import cross_entropy, topk_forward_kl

        ids = torch.where(targets == 1, self.label_ids[0], self.label_ids[1])
        ce = cross_entropy(logits, ids)
        out = teacher_outs[0]
        kd = topk_forward_kl(logits, out["topk_logprobs"], out["topk_ids"], out["tail_logprob"],
                             temperature=self.teacher["temperature"])
        loss = self.cfg.get("ce_weight", 1.0) * ce + self.teacher["weight"] * kd
        return loss, {"loss_ce": ce.item(), "loss_kd_bench": kd.item()}


def e2e_worker_loop(cfg: dict) -> dict:
    """Ray Train worker: the distillation loop (StageLoss prefetching teacher outputs) on a random student."""
    import ray.train

    torch.set_num_threads(max(1, int(cfg["threads"])))
    cuda = cfg["cuda"] and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = Shape(**dict(cfg["shape"], fullatt=tuple(cfg["shape"]["fullatt"])))
    label_ids = tuple(cfg["label_ids"])
    t = time.perf_counter()
    model = build_model(shape, device, dtype, cfg["attn"], seed=1).train()
    if cfg["grad_ckpt"]:
        _enable_ckpt(model, False)
    opt, opt_name = make_optimizer(model.parameters())
    build_s = time.perf_counter() - t
    loss_cfg = {"teachers": [{"name": TEACHER_NAME, "replicas": 1, "stage": "bench", "weight": 1.0,
                              "temperature": cfg["temperature"]}],
                "k": cfg["k"], "ce_weight": 1.0, "prefetch": cfg["prefetch"]}
    try:
        from workers.train_loop import StageLoss

        stage_loss, impl = StageLoss(loss_cfg, label_ids), "workers.train_loop.StageLoss"
    except Exception as exc:  # noqa: BLE001  (e.g. PIL or a transformers module missing on the device image)
        stage_loss, impl = LocalStageLoss(loss_cfg, label_ids), f"LocalStageLoss ({type(exc).__name__}: {exc})"
    pool = [make_batch(shape, cfg["batch"], cfg["image"], cfg["text"], 200 + i, cfg["mm_types"]) for i in range(3)]
    total = cfg["warmup"] + cfg["steps"]
    batches = (pool[i % len(pool)] for i in range(total))
    waits, losses, step_times = [], [], []
    t0 = None
    for i, (batch, pending) in enumerate(stage_loss.with_teacher_outputs(batches)):
        if i == cfg["warmup"]:
            sync(device)
            t0 = time.perf_counter()
        ts = time.perf_counter()
        teacher_out, wait = stage_loss.wait(pending)
        teacher_out = [{k: v.to(device) for k, v in o.items()} for o in teacher_out]  # StageLoss keeps them on CPU
        inputs = to_model(batch, device, dtype)
        logits = answer_logits(model, inputs)
        loss, _ = stage_loss(logits, batch["target"].to(device), teacher_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= cfg["warmup"]:
            waits.append(wait)
            losses.append(loss.detach().item())  # syncs, like the real loop's loss.item()
            step_times.append(time.perf_counter() - ts)
    sync(device)
    elapsed = time.perf_counter() - t0
    result = {"impl": impl, "optimizer": opt_name, "grad_ckpt": cfg["grad_ckpt"], "build_s": round(build_s, 1),
              "prefetch": cfg["prefetch"], "steps": cfg["steps"], "elapsed_s": round(elapsed, 3),
              "step_s_mean": round(elapsed / cfg["steps"], 4), "step_s_all": [round(x, 4) for x in step_times],
              "samples_per_s": round(cfg["steps"] * cfg["batch"] / elapsed, 3),
              "teacher_wait_s_mean": round(sum(waits) / len(waits), 4), "teacher_wait_s_all": [round(x, 4) for x in waits],
              "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
              "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "worker_pid": os.getpid()}
    Path(cfg["result_path"]).write_text(json.dumps(result))
    return result


def e2e_grad_ckpt(ctx: Ctx) -> bool:
    """Checkpointing in the e2e student when asked, when the in-process student needed it, or when the GPU is
    too small for a 3B full fine-tune (~80 GB) next to the 7B teacher (~20 GB)."""
    student = ctx.record["parts"].get("student", {})
    small_gpu = ctx.cuda and torch.cuda.get_device_properties(0).total_memory < 120 * 2**30
    return bool(ctx.args.grad_ckpt or student.get("grad_ckpt_auto_after_oom") or small_gpu)


def part_e2e(ctx: Ctx) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    a = ctx.args
    ensure_actor(ctx)
    if ctx.cuda and ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError(f"Ray sees no GPU: {ray.cluster_resources()}")
    storage = tempfile.mkdtemp(prefix="gpu-bench-ray-")
    result_path = str(Path(storage) / "e2e.json")
    cfg = {"shape": asdict(ctx.student_shape), "label_ids": list(ctx.label_ids), "attn": a.attn, "cuda": ctx.cuda,
           "grad_ckpt": e2e_grad_ckpt(ctx), "k": a.k, "temperature": a.temperature, "prefetch": a.prefetch,
           "batch": a.batch, "image": a.image, "text": a.text, "mm_types": ctx.mm_types, "warmup": a.warmup,
           "steps": a.e2e_steps or a.steps, "threads": a.worker_cpus, "result_path": result_path}
    per_worker = {"CPU": a.worker_cpus}
    if ctx.cuda:
        per_worker["GPU"] = 0.5
    trainer = TorchTrainer(
        e2e_worker_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=ctx.cuda, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="gloo"),  # one worker: no collectives, and no NCCL set-up to go wrong
        run_config=RunConfig(name="gpu-bench-e2e", storage_path=storage),
    )
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = time.perf_counter()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    timeout = max(60.0, ctx.remaining() + 20)
    thread.join(timeout)
    fit_s = time.perf_counter() - t
    if thread.is_alive():
        raise TimeoutError(f"TorchTrainer.fit still running after {timeout:.0f}s")
    if "error" in box:
        raise box["error"]
    res = box["result"]
    if getattr(res, "error", None):
        raise res.error
    out = getattr(res, "return_value", None) or json.loads(Path(result_path).read_text())
    out = dict(out, fit_s=round(fit_s, 1), worker_resources=per_worker, actor_num_gpus=0.5 if ctx.cuda else 0)
    return out


PARTS = {"teacher": part_teacher, "student": part_student, "lora": part_lora, "actor": part_actor, "e2e": part_e2e}


# --------------------------------------------------------------------------------------------- report


def summarize(ctx: Ctx) -> None:
    p = ctx.record["parts"]
    rate = lambda name: p.get(name, {}).get("samples_per_s")  # noqa: E731
    t, s, e = rate("teacher"), rate("student"), rate("e2e")
    summary = {}
    if t and s:
        summary["bound_sequential_samples_per_s"] = round(1 / (1 / t + 1 / s), 3)
        summary["bound_overlap_samples_per_s"] = round(min(t, s), 3)
        if e:
            summary["e2e_vs_sequential"] = round(e / summary["bound_sequential_samples_per_s"], 3)
            summary["e2e_vs_overlap"] = round(e / summary["bound_overlap_samples_per_s"], 3)
    flops = lambda name: p.get(name, {}).get("tflops_per_sample")  # noqa: E731
    if e and flops("student"):
        summary["e2e_student_tflops"] = round(e * flops("student"), 2)
        if flops("teacher"):
            summary["e2e_teacher_plus_student_tflops"] = round(e * (flops("student") + flops("teacher")), 2)
        if ctx.peak:
            summary["e2e_student_mfu"] = round(summary["e2e_student_tflops"] / ctx.peak, 4)
            if "e2e_teacher_plus_student_tflops" in summary:
                summary["e2e_total_mfu"] = round(summary["e2e_teacher_plus_student_tflops"] / ctx.peak, 4)
    if rate("actor") and t:
        summary["actor_vs_inprocess_teacher"] = round(rate("actor") / t, 3)
    ctx.record["summary"] = summary


def print_table(ctx: Ctx) -> None:
    rows = [("part", "s/step", "samples/s", "peak GB", "TFLOP/s", "MFU", "notes")]
    for name, r in ctx.record["parts"].items():
        if "error" in r or "skipped" in r:
            rows.append((name, "-", "-", "-", "-", "-", (r.get("skipped") or r["error"])[:70]))
            continue
        notes = []
        if name == "teacher":
            notes.append(f"top-{ctx.args.k} {r['topk_ms']} ms, build {r['build_s']}s")
        if name in ("student", "lora"):
            notes.append(f"ckpt={r['grad_ckpt']} trainable={r['params']['trainable'] / 1e6:.1f}M")
        if name == "actor":
            notes.append(f"latency {r['latency_s']} s, reply {r['reply_bytes_per_sample']} B/sample")
        if name == "e2e":
            notes.append(f"teacher wait {r['teacher_wait_s_mean']} s/step, {r['impl'].split(' ')[0]}")
        mfu_v = r.get("mfu")
        rows.append((name, f"{r.get('step_s_mean', float('nan')):.3f}", f"{r['samples_per_s']:.2f}",
                     str(r.get("peak_gb")), str(r.get("achieved_tflops", "-")),
                     f"{100 * mfu_v:.1f}%" if mfu_v is not None else "-", "; ".join(notes)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    print(flush=True)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6], flush=True)
    for k, v in ctx.record["summary"].items():
        print(f"{k}: {v}", flush=True)
    print(flush=True)


def meta(ctx: Ctx) -> dict:
    import transformers

    m = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "cuda": ctx.cuda, "device": ctx.device, "dtype": str(ctx.dtype), "args": vars(ctx.args),
         "teacher_shape": asdict(ctx.teacher_shape), "student_shape": asdict(ctx.student_shape),
         "seq_len": ctx.seq, "patches_per_image": ctx.patches, "image_tokens": ctx.patches // 4,
         "mm_token_type_ids": ctx.mm_types, "peak_bf16_tflops": ctx.peak, "flops_formula": FLOPS_FORMULA,
         "cpu_count": os.cpu_count()}
    for mod in ("peft", "ray"):
        try:
            m[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            m[mod] = f"unavailable: {exc}"
    if ctx.cuda:
        prop = torch.cuda.get_device_properties(0)
        m.update(gpu=prop.name, gpu_mem_gb=round(prop.total_memory / 2**30, 1), cuda_version=torch.version.cuda,
                 capability=f"{prop.major}.{prop.minor}")
    return m


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma list of {', '.join(ALL_PARTS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (dry run of every code path)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (16; tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per part (5; tiny 2)")
    ap.add_argument("--e2e-steps", type=int, default=None, help="timed e2e steps (default: --steps + 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (2; tiny 1)")
    ap.add_argument("--image", type=int, default=None, help="image side in px, multiple of 28 (448; tiny 112)")
    ap.add_argument("--text", type=int, default=None, help="non-image tokens per sample (64; tiny 16)")
    ap.add_argument("--k", type=int, default=64, help="teacher top-k")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--prefetch", type=int, default=1, help="teacher batches in flight ahead (e2e)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2, ...)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (default off; auto on OOM)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--actor-cpus", type=int, default=None, help="teacher actor CPUs/threads (2; tiny 1)")
    ap.add_argument("--worker-cpus", type=int, default=None, help="train worker CPUs/threads (4; tiny 1)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="bf16 dense peak for MFU")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; parts not started by then are skipped")
    ap.add_argument("--json", default=None, help="JSON path (default $OUT/gpu.json when $OUT is set)")
    args = ap.parse_args(argv)
    defaults = dict(batch=(4, 16), steps=(2, 5), warmup=(1, 2), image=(112, 448), text=(16, 64),
                    actor_cpus=(1, 2), worker_cpus=(1, 4))
    for key, (tiny, real) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else real)
    if args.e2e_steps is None:
        args.e2e_steps = args.steps + 3
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(ALL_PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {ALL_PARTS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = Ctx(args)
    if not args.tiny and not ctx.cuda:
        log("WARNING: no CUDA device; running the real shapes on CPU will be very slow (use --tiny)")
    if args.tiny:
        torch.set_num_threads(1)  # like the Ray actor/worker (1 CPU each); 2 shared cores thrash with more
    ctx.record["meta"] = meta(ctx)
    log(f"device={ctx.device} dtype={ctx.dtype} parts={args.parts} batch={args.batch} steps={args.steps} "
        f"seq={ctx.seq} patches/image={ctx.patches} transformers={ctx.record['meta']['transformers']}")
    ctx.save()
    # In-process parts first, then the Ray ones (after the driver has freed its GPU memory).
    for name in [p for p in ALL_PARTS if p in args.parts]:
        if ctx.remaining() <= (60 if name in ("actor", "e2e") else 0):
            ctx.record["parts"][name] = {"skipped": f"budget {args.budget:.0f}s spent"}
            log(f"{name}: skipped (budget)")
            ctx.save()
            continue
        log(f"{name}: start")
        t = time.perf_counter()
        try:
            r = PARTS[name](ctx)
            r["part_wall_s"] = round(time.perf_counter() - t, 1)
            log(f"{name}: {r.get('samples_per_s')} samples/s ({r['part_wall_s']}s)")
        except BaseException as exc:  # noqa: BLE001  (record and go on; Ctrl-C still stops the run)
            if isinstance(exc, KeyboardInterrupt):
                raise
            r = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-6000:],
                 "part_wall_s": round(time.perf_counter() - t, 1)}
            log(f"{name}: FAILED {r['error'][:300]}")
        free(ctx.device)  # outside the except block: the traceback no longer pins the failed part's tensors
        ctx.record["parts"][name] = r
        summarize(ctx)
        ctx.save()
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass
    ctx.record["meta"]["total_wall_s"] = round(time.perf_counter() - T0, 1)
    ctx.save()
    print_table(ctx)
    log(f"done in {ctx.record['meta']['total_wall_s']}s")
    return 0 if all("error" not in r for r in ctx.record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
