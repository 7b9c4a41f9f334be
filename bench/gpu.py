"""One-shot benchmark of the product's own distillation code on a GPU; `--tiny` is its CPU smoke run (CI).

Everything timed is what `hkd run` runs: model dirs written by `workers.models.model_dirs` and loaded with
`load_model_dir`, the teacher actor class `workers.teachers.pool.Teacher` / `TeacherPool`, the stage objective
`workers.training.objectives.StageObjective` with `workers.training.optim`, and a whole stage through `orchestrator.run.stages.run_task_stage`
(the Ray Train loop `workers.training.loop`, teacher prefetch `workers.teachers.requests`). This file holds only
measurement: inputs, timers, FLOPs, the report. It defines no model, teacher or loss of its own.

Parts (each optional, each guarded: a failure is recorded in the JSON and the next part runs):

  teacher  `Teacher` in-process: load time, then `infer` (forward at the answer position + top-k wire): samples/s, MFU
  student  load the student dir, one step of the PPOD objective (CE + top-k KD, `--kd-loss`) against precomputed
           teacher outputs, `optim.update` (AdamW, grad clip): samples/s, MFU
  lora     the same step with `workers.models.lora.add_lora` (r=--lora-r on q/k/v/o of the text model): samples/s, MFU
  actor    `TeacherPool.start` (num_gpus=0.5) answering `submit` in the wire format: samples/s, latency
  e2e      `run_task_stage` of a PPOD stage (one Ray Train worker, num_gpus=0.5) against that pool, prefetching:
           the loop's steady-state samples/s and its ratio to the in-process bounds

Models: `--teacher-dir/--student-dir` take real checkpoints (the path a user with weights runs). Without them
the bench writes random-init dirs: at real sizes, the mirrored hub config.json (`configs/qwen2_5_vl/`, 7B teacher,
3B student) over the product's tokenizer (special-token ids remapped to it); with `--tiny`, `build_level` of
tiny `LevelShape`s. Inputs are the product's prompts (`workers.data.synth` records → `encode_records` →
`collate_records`, one row per record) at `--image` px.

    python bench/gpu.py                       # everything, GPU
    python bench/gpu.py --tiny                # tiny shapes on CPU: every code path, timings meaningless
    python bench/gpu.py --parts teacher,student --steps 3 --batch 8

Prints progress lines and a table; writes JSON to $OUT/gpu.json when $OUT is set (or --json PATH), rewritten
after every part so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Ray actors and train workers inherit the environment of the raylet this process starts: make `workers`
# importable there without an installed package.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)])

import torch  # noqa: E402

from orchestrator.cluster.machine import describe, probe  # noqa: E402
from workers.models.model_dirs import LevelShape  # noqa: E402

ALL_PARTS = ("teacher", "student", "lora", "actor", "e2e")
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16
HUB = {"teacher": "Qwen2.5-VL-7B-Instruct", "student": "Qwen2.5-VL-3B-Instruct"}
TINY = {"teacher": LevelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32,
                              vision_depth=2, vision_heads=2),
        "student": LevelShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_hidden=32,
                              vision_depth=2, vision_heads=2)}
POOL = "bench"
PATCH, MERGE = 14, 2
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu-bench {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- model dirs, inputs


def hub_config(name: str, tokenizer):
    """The mirrored hub config.json of `name`, its special-token ids remapped to the product's tokenizer."""
    from transformers import Qwen2_5_VLConfig

    from workers.models.model_dirs import SPECIAL_TOKENS

    config = Qwen2_5_VLConfig.from_json_file(str(ROOT / "configs" / "qwen2_5_vl" / f"{name}.json"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (ids["<|endoftext|>"], ids["<|im_end|>"],
                                                               ids["<|endoftext|>"])
    return config


def write_model_dir(ctx: Ctx, role: str) -> Path:
    """A random-init model dir the product loads: `build_level` (tiny) or a hub config's shape (real sizes)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.models.families.qwen2_5_vl import build_processor
    from workers.models.model_dirs import CHAT_TEMPLATE, build_level, save_model_dir

    out = ctx.work / role
    if ctx.tiny:
        return build_level(out, TINY[role], ctx.tokenizer, ctx.args.image, seed=len(role))
    torch.manual_seed(len(role))
    with torch.device(ctx.device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hub_config(HUB[role], ctx.tokenizer), dtype=ctx.dtype)
    processor = build_processor(ctx.tokenizer, ctx.args.image, CHAT_TEMPLATE)
    save_model_dir(model, processor, out)
    del model
    free(ctx.device)
    return out


def records(ctx: Ctx, split: str) -> list[dict]:
    from workers.data.records import load_jsonl
    from workers.data.synth import TASKS

    return [r for task in TASKS for r in load_jsonl(ctx.work / "data" / task / f"{split}.jsonl")]


def prepare(ctx: Ctx) -> None:
    """Benchmark records at `--image` px, the tokenizer, and the teacher and student dirs (given or written)."""
    from workers.models.families import load_processor
    from workers.models.model_dirs import build_tokenizer
    from workers.models.prompts import record_units
    from workers.data.synth import SynthSpec, generate, sample_texts

    a = ctx.args
    n = max(4, a.batch * (a.e2e_steps + a.warmup + 2) // 2)  # scenes per task; one unit (forward) per record
    generate(ctx.work / "data", seed=0, n_train=n, n_val=max(2, a.batch // 4), n_test=1,
             spec=SynthSpec(image_size=a.image))
    ctx.units = record_units(records(ctx, "train"))
    t = time.perf_counter()
    if a.student_dir:
        ctx.tokenizer = load_processor(a.student_dir).tokenizer
    else:
        ctx.tokenizer = build_tokenizer([u["text"] + u["answer"] for u in ctx.units] + sample_texts(500), vocab_size=1024)
    ctx.dirs = {role: Path(given) if given else write_model_dir(ctx, role)
                for role, given in (("teacher", a.teacher_dir), ("student", a.student_dir))}
    ctx.record["meta"]["model_dirs"] = {k: str(v) for k, v in ctx.dirs.items()}
    ctx.record["meta"]["prepare_s"] = round(time.perf_counter() - t, 1)
    log(f"model dirs ready in {ctx.record['meta']['prepare_s']}s: {ctx.record['meta']['model_dirs']}")


def batches(ctx: Ctx, processor, image_token_id: int, n: int, offset: int = 0) -> list[dict]:
    """`n` collated batches of the product's prompts (on CPU, as a train worker's shard hands them over)."""
    from workers.models.prompts import collate_records, encode_records

    b = ctx.args.batch
    units = [ctx.units[(offset + i) % len(ctx.units)] for i in range(n * b)]
    pad_id = processor.tokenizer.pad_token_id
    return [collate_records(encode_records(units[i:i + b], processor), pad_id, image_token_id)
            for i in range(0, n * b, b)]


# --------------------------------------------------------------------------------------------- FLOPs


def dims(model) -> dict:
    """The sizes the FLOPs count needs, from a loaded model's config."""
    cfg = getattr(model, "config", None) or model.base_model.model.config
    text, vision = cfg.text_config, cfg.vision_config
    return {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size,
            "v_hidden": vision.hidden_size, "v_depth": vision.depth, "n_full": len(vision.fullatt_block_indexes),
            "window": vision.window_size}


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
    "embed_tokens/lm_head; L = mean tokens per sample of the batch (image + prompt); P = patches per image; "
    "W = patches per 112 px window (64). Forward: m=m_v=2, a=a_v=1. Full training: m=m_v=6, a=a_v=3. LoRA: m=4 "
    "(frozen weights: forward + activation grads), a=3, vision frozen and not backpropagated m_v=2, a_v=1. "
    "Attention counted without causal halving. MFU = FLOPs/sample * samples/s / peak (989 TFLOP/s bf16 dense)."
)


def flops_per_sample(d: dict, params: dict[str, int], seq: float, patches: int, mode: str) -> float:
    """Model FLOPs of one sample (see FLOPS_FORMULA). mode: forward | lora | full."""
    m_text = {"forward": 2, "lora": 4, "full": 6}[mode]
    m_vis = {"forward": 2, "lora": 2, "full": 6}[mode]
    a_text = 1 if mode == "forward" else 3
    a_vis = 3 if mode == "full" else 1
    text = m_text * params["text"] * seq + a_text * 4 * d["hidden"] * seq * seq * d["layers"]
    head = m_text * d["hidden"] * d["vocab"]
    window_patches = min(patches, (d["window"] // PATCH) ** 2)
    vis_attn = 4 * d["v_hidden"] * patches * (d["n_full"] * patches + (d["v_depth"] - d["n_full"]) * window_patches)
    vision = (m_vis * (params["v_patch"] + params["v_blocks"]) * patches + m_vis * params["v_merger"] * patches / 4
              + a_vis * vis_attn)
    return float(text + head + vision)


def seq_len(batch: dict) -> float:
    return float(batch["attention_mask"].sum()) / batch["attention_mask"].shape[0]


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
    """What every part needs: sizes, device, the model dirs, and the shared JSON record."""

    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        grid = args.image // PATCH
        self.patches = grid * grid
        self.peak = args.peak_tflops if self.cuda else None
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu-bench-"))
        self.record: dict = {"meta": {}, "parts": {}, "summary": {}}
        self.pool = None

    def loss_config(self, prefetch: int = 0):
        """The PPOD stage loss the student parts and e2e run: one teacher, the run config's other defaults."""
        from orchestrator.run.stages import default_stage_loss

        a = self.args
        return default_stage_loss([{"stage": POOL, "pool": POOL, "temperature": a.temperature}], k=a.k,
                                  kd_loss=a.kd_loss, prefetch=prefetch)

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
    """The teacher actor's class in-process: load its dir, then `infer` on wire inputs (as an actor call does)."""
    from workers.teachers.pool import Teacher, to_numpy_inputs

    a = ctx.args
    t = time.perf_counter()
    teacher = Teacher(ctx.dirs["teacher"], threads=a.actor_cpus)
    load_s = time.perf_counter() - t
    log(f"teacher loaded in {load_s:.1f}s")
    batch = batches(ctx, processor_of(ctx.dirs["teacher"]), teacher.model.config.image_token_id, 1)[0]
    wire = to_numpy_inputs(batch)
    reset_peak(ctx.device)
    times = timed_steps(lambda: teacher.infer(wire, a.k, a.temperature), a.warmup, a.steps, ctx.device)
    params = count_params(teacher.model)
    out = {"model_dir": str(ctx.dirs["teacher"]), "params": params, "load_s": round(load_s, 1),
           "peak_gb": peak_gb(ctx.device), "seq_len": seq_len(batch), "device": teacher.device,
           "impl": "workers.teachers.pool.Teacher.infer", **rates(times, a.batch)}
    out.update(mfu(flops_per_sample(dims(teacher.model), params, out["seq_len"], ctx.patches, "forward"),
                   out["samples_per_s"], ctx.peak))
    del teacher
    free(ctx.device)
    return out


def processor_of(model_dir: Path):
    from workers.models.families import load_processor

    return load_processor(model_dir)


def _student_setup(ctx: Ctx, lora: bool):
    from orchestrator.config.schema import LoraSettings
    from workers.models.lora import add_lora
    from workers.models.model_dirs import load_model_dir
    from workers.training.optim import adamw

    a = ctx.args
    t = time.perf_counter()
    model, processor = load_model_dir(ctx.dirs["student"], dtype=ctx.dtype, device=ctx.device)
    if lora:
        model = add_lora(model, LoraSettings(r=a.lora_r, alpha=2.0 * a.lora_r).model_dump())
    if a.grad_ckpt:
        _enable_ckpt(model, lora)
    model.train()
    return model, processor, adamw(model, 1e-5, 0.0), time.perf_counter() - t


def _student_run(ctx: Ctx, lora: bool) -> dict:
    """One stage step as the train loop takes it: `StageObjective` (PPOD) on precomputed teacher outputs."""
    from workers.inference.logits import position_logits, to_device
    from workers.models.model_dirs import label_word_ids
    from workers.training.objectives import StageObjective
    from workers.training.optim import update
    from workers.teachers.outputs import from_wire, wire_outputs

    a = ctx.args
    model, processor, opt, load_s = _student_setup(ctx, lora)
    log(f"{'lora' if lora else 'full'} student loaded in {load_s:.1f}s (grad_ckpt={a.grad_ckpt})")
    label_ids, vocab = label_word_ids(processor.tokenizer), len(processor.tokenizer)
    objective = StageObjective(ctx.loss_config(), label_ids, vocab=vocab)
    image_id = (model.config if not lora else model.base_model.model.config).image_token_id
    batch = to_device(batches(ctx, processor, image_id, 1, offset=a.batch)[0], ctx.device)
    g = torch.Generator().manual_seed(0)
    n_pos = len(batch["positions"])  # one teacher row per supervised position (a record may have several)
    teacher_out = [from_wire(wire_outputs(torch.randn(n_pos, vocab, generator=g) * 3, label_ids, a.k,
                                          a.temperature)).to(ctx.device)]
    losses = []

    def step():
        loss, _ = objective(position_logits(model, batch), batch["target"], teacher_out)
        update(loss, model, opt, grad_clip=1.0)
        losses.append(loss.detach())

    reset_peak(ctx.device)
    grad_ckpt, auto_ckpt = bool(a.grad_ckpt), False
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
    out = {"model_dir": str(ctx.dirs["student"]), "params": params, "load_s": round(load_s, 1),
           "peak_gb": peak_gb(ctx.device), "grad_ckpt": grad_ckpt, "grad_ckpt_auto_after_oom": auto_ckpt,
           "param_dtype": str(ctx.dtype), "seq_len": seq_len(batch),
           "impl": f"workers.training.objectives.StageObjective(ppod, kd_loss={a.kd_loss}) + workers.training.optim.update",
           "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)], **rates(times, a.batch)}
    if lora:
        out["lora"] = {"r": a.lora_r, "alpha": 2 * a.lora_r, "impl": "workers.models.lora.add_lora"}
    out.update(mfu(flops_per_sample(dims(model), params, out["seq_len"], ctx.patches, "lora" if lora else "full"),
                   out["samples_per_s"], ctx.peak))
    del model, opt, batch, losses, teacher_out
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


def ensure_ray(ctx: Ctx):
    import ray

    if not ray.is_initialized():
        cpus = max(os.cpu_count() or 1, 4) + 1
        gpus = torch.cuda.device_count() if ctx.cuda else 0
        t = time.perf_counter()
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=True, logging_level="warning")
        ctx.record["meta"]["ray_init_s"] = round(time.perf_counter() - t, 1)
        ctx.record["meta"]["ray_resources"] = ray.cluster_resources()
        log(f"ray up in {time.perf_counter() - t:.1f}s: {ray.cluster_resources()}")
    return ray


def ensure_pool(ctx: Ctx):
    """The product's teacher pool (one replica, half a GPU), started once for the Ray parts."""
    if ctx.pool is not None:
        return ctx.pool
    ray = ensure_ray(ctx)
    from workers.teachers.pool import TeacherPool

    a = ctx.args
    t = time.perf_counter()
    pool = TeacherPool.start(POOL, ctx.dirs["teacher"], replicas=1, num_cpus=a.actor_cpus,
                             num_gpus=0.5 if ctx.cuda else 0, max_restarts=0)
    info = ray.get(pool.handles[0].info.remote(), timeout=max(60.0, min(600.0, ctx.remaining())))
    info["start_s"] = round(time.perf_counter() - t, 1)
    log(f"teacher pool ready in {info['start_s']}s: {info}")
    ctx.pool, ctx.pool_info = pool, info
    return pool


def part_actor(ctx: Ctx) -> dict:
    """`TeacherPool.submit` of the wire inputs: one at a time (latency), then all queued (throughput)."""
    import ray

    from workers.teachers.pool import to_numpy_inputs

    a = ctx.args
    pool = ensure_pool(ctx)
    processor = processor_of(ctx.dirs["teacher"])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    wires = [to_numpy_inputs(b) for b in batches(ctx, processor, image_id, min(3, a.steps))]
    nbytes_in = sum(v.nbytes for v in wires[0].values())
    timeout = max(60.0, ctx.remaining())
    for i in range(a.warmup):
        ray.get(pool.submit(wires[i % len(wires)], a.k, a.temperature), timeout=timeout)
    lat = []
    for i in range(2):
        t = time.perf_counter()
        out = ray.get(pool.submit(wires[i % len(wires)], a.k, a.temperature), timeout=timeout)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    outs = ray.get([pool.submit(wires[i % len(wires)], a.k, a.temperature) for i in range(a.steps)], timeout=timeout)
    elapsed = time.perf_counter() - t
    nbytes_out = sum(v.nbytes for v in outs[0].values())
    return {"actor": ctx.pool_info, "impl": "workers.teachers.pool.TeacherPool", "num_gpus": 0.5 if ctx.cuda else 0,
            "num_cpus": a.actor_cpus, "latency_s": [round(x, 4) for x in lat],
            "step_s_mean": round(elapsed / a.steps, 4), "samples_per_s": round(a.steps * a.batch / elapsed, 3),
            "request_bytes": int(nbytes_in), "reply_bytes": int(nbytes_out),
            "reply_bytes_per_sample": round(nbytes_out / a.batch, 1),
            "reply_keys": {k: [list(v.shape), str(v.dtype)] for k, v in out.items()}}


def part_e2e(ctx: Ctx) -> dict:
    """A PPOD stage through `run_task_stage`, as `hkd run` trains one: Ray Data shards, the Ray Train loop,
    prefetched teacher requests."""
    import ray

    from orchestrator.config.schema import KDSettings, Resources, RunConfig, TrainConfig
    from orchestrator.run.inputs import encode_split
    from orchestrator.run.kinds import PPOD, StagePlan, StageTeacher
    from orchestrator.run.stages import StageData, StageTeachers, run_task_stage

    a = ctx.args
    ensure_pool(ctx)
    if ctx.cuda and ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError(f"Ray sees no GPU: {ray.cluster_resources()}")
    processor = processor_of(ctx.dirs["student"])
    train_ds, val_ds = encode_split(records(ctx, "train"), processor), encode_split(records(ctx, "val"), processor)
    n_units = min(train_ds.count(), a.batch * (a.e2e_steps + 1))
    train_ds = train_ds.limit(n_units).materialize()
    res = Resources(num_workers=1, cpus_per_worker=a.worker_cpus, use_gpu=ctx.cuda, gpus_per_worker=0.5)
    train = TrainConfig(epochs=1, batch_size=a.batch, lr=1e-5, dtype="bfloat16" if ctx.cuda else "float32",
                        log_every=1000)
    # the loss `ctx.loss_config` gives the student parts: one teacher (the pool), the run config's other defaults
    cfg = RunConfig(levels={"S": {}, "T": {}}, direct={"levels": ["S"]}, resources=res,
                    teachers={"k": a.k, "prefetch": a.prefetch})
    plan = StagePlan("bench-e2e", "S", PPOD, None, train, teachers=(StageTeacher(POOL, "T", 1.0, a.temperature, False),),
                     kd=KDSettings(kd_loss=a.kd_loss))
    data = StageData(train_ds, val_ds, [], lambda: (processor, {}))
    t = time.perf_counter()
    result = run_task_stage(cfg, plan, ctx.dirs["student"], ctx.work / "e2e-out", data,
                            StageTeachers({POOL: POOL}, cache_root=""), ctx.work / "ray", None)
    fit_s = time.perf_counter() - t
    return {"impl": "orchestrator.run.stages.run_task_stage → workers.training.loop", "prefetch": a.prefetch,
            "steps": result.get("steps"), "samples_per_s": round(result["train_samples_per_s"], 3),
            "teacher_calls": result.get("teacher/calls"), "fit_s": round(fit_s, 1),
            "worker_resources": {"CPU": a.worker_cpus, "GPU": 0.5 if ctx.cuda else 0},
            "val_f1": result.get("f1")}


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
            notes.append(f"top-{ctx.args.k}, load {r['load_s']}s")
        if name in ("student", "lora"):
            notes.append(f"ckpt={r['grad_ckpt']} trainable={r['params']['trainable'] / 1e6:.1f}M")
        if name == "actor":
            notes.append(f"latency {r['latency_s']} s, reply {r['reply_bytes_per_sample']} B/sample")
        if name == "e2e":
            notes.append(f"{r['steps']} steps, prefetch {r['prefetch']}, fit {r['fit_s']}s")
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
         "models": {"tiny": {k: dataclasses.asdict(v) for k, v in TINY.items()}} if ctx.tiny else HUB,
         "patches_per_image": ctx.patches, "image_tokens": ctx.patches // 4,
         "peak_bf16_tflops": ctx.peak, "flops_formula": FLOPS_FORMULA,
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
    ap.add_argument("--kd-loss", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"),
                    help="the stage objective's divergence")
    ap.add_argument("--teacher-dir", help="a teacher model dir (a real checkpoint); default: a random-init 7B shape")
    ap.add_argument("--student-dir", help="a student model dir (a real checkpoint); default: a random-init 3B shape")
    ap.add_argument("--work", help="where data, model dirs and Ray storage go (default: a temp dir)")
    ap.add_argument("--k", type=int, default=64, help="teacher top-k")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--prefetch", type=int, default=1, help="teacher batches in flight ahead (e2e)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (default off; auto on OOM)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--actor-cpus", type=int, default=None, help="teacher actor CPUs/threads (2; tiny 1)")
    ap.add_argument("--worker-cpus", type=int, default=None, help="train worker CPUs/threads (4; tiny 1)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="bf16 dense peak for MFU")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; parts not started by then are skipped")
    ap.add_argument("--json", default=None, help="JSON path (default $OUT/gpu.json when $OUT is set)")
    args = ap.parse_args(argv)
    defaults = dict(batch=(4, 16), steps=(2, 5), warmup=(1, 2), image=(112, 448),
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
    ctx.record["meta"] = meta(ctx) | {"machine": probe()}
    log(f"machine: {describe(ctx.record['meta']['machine'])} ({ctx.record['meta']['machine']['cpu']})")
    log(f"device={ctx.device} dtype={ctx.dtype} parts={args.parts} batch={args.batch} steps={args.steps} "
        f"patches/image={ctx.patches} transformers={ctx.record['meta']['transformers']}")
    ctx.save()
    prepare(ctx)
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
