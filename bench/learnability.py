"""How many steps does each tiny level need on the procedural benchmark? Validation macro-F1 over steps.

In-process (no Ray), on CPU or CUDA, same model, prompts and loss as the direct-tuning stage; used to size
schedules and the generator's difficulty. Prints one line per evaluation and a JSON summary.

    python bench/learnability.py --levels S,M,L --steps 2000 --eval-every 250 [--device cuda] [--spec '{...}']
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from workers import grounding, synth
from workers.data import load_jsonl
from workers.losses import cross_entropy
from workers.models import LevelShape, build_level, build_tokenizer, label_word_ids, load_model_dir
from workers.prompts import collate, encode_units, expand_units
from workers.inference import answer_logits, predict, target_token_ids, task_metrics, to_device
from workers.optim import lr_at

SHAPES = {
    "L": LevelShape(512, 8, 8, 4, 1408, 384, 4, 6),
    "M": LevelShape(256, 4, 4, 2, 704, 192, 2, 3),
    "S": LevelShape(128, 2, 2, 1, 352, 96, 1, 2),
}


def pretrain(model: torch.nn.Module, processor, spec: synth.SynthSpec, steps: int, batch_size: int, lr: float,
             device: str, seed: int) -> None:
    """Grounding pre-training on fresh scenes (workers/grounding.py); prints the description loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        scenes = synth.random_scenes(seed * 1_000_003 + step, batch_size, spec)
        batch = to_device(grounding.collate(grounding.encode_scenes(scenes, processor), pad_id, image_id), device)
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, steps, max(1, steps // 20))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = grounding.grounding_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(json.dumps({"pretrain_step": step + 1, "loss": round(loss.item(), 4),
                              "s": round(time.perf_counter() - start, 1)}), flush=True)


def curve(model_dir: Path, train: dict, val: dict, steps: int, batch_size: int, lr: float, eval_every: int,
          device: str, seed: int, spec: synth.SynthSpec, pretrain_steps: int = 0,
          pretrain_lr: float = 1e-3) -> list[dict]:
    """Train one level from its init dir (after grounding pre-training, if asked); validation metrics
    every `eval_every` steps."""
    torch.manual_seed(seed)
    model, processor = load_model_dir(model_dir, device=device)
    if pretrain_steps:
        pretrain(model, processor, spec, pretrain_steps, batch_size, pretrain_lr, device, seed)
    label_ids = label_word_ids(processor.tokenizer)
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    n = len(train["uid"])
    val_batches = [to_device(collate({k: v[i:i + 256] for k, v in val.items()}, pad_id, image_id), device)
                   for i in range(0, len(val["uid"]), 256)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    order, pos, points, start = rng.permutation(n), 0, [], time.perf_counter()
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        batch = to_device(collate({k: v[idx] for k, v in train.items()}, pad_id, image_id), device)
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, steps, max(1, steps // 20))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = cross_entropy(answer_logits(model, batch), target_token_ids(batch["target"], label_ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                pred = predict(model, val_batches, label_ids)
            metrics = task_metrics(pred, val["task"])
            point = {"step": step + 1, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - start, 1),
                     **{k: round(v, 4) for k, v in metrics.items() if k.endswith("f1")}}
            points.append(point)
            print(json.dumps(point), flush=True)
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--levels", default="S,M,L")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=str, default="S=2e-3,M=1e-3,L=5e-4")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--spec", default="{}", help="SynthSpec fields as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0, help="grounding pre-training steps first")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--tasks", default=",".join(synth.TASKS), help="train and score only these tasks")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lrs = dict(item.split("=") for item in args.lr.split(","))
    spec = synth.SynthSpec(**{k: tuple(map(tuple, v)) if isinstance(v, list) and v and isinstance(v[0], list)
                              else tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.spec).items()})
    work = Path(tempfile.mkdtemp(prefix="learn-"))
    synth.generate(work / "data", seed=args.seed, n_train=args.train, n_val=args.val, n_test=1, spec=spec)
    records = {s: [r for t in args.tasks.split(",") for r in load_jsonl(work / "data" / t / f"{s}.jsonl")] for s in ("train", "val")}
    units = {s: expand_units(r) for s, r in records.items()}
    tokenizer = build_tokenizer([u["text"] for u in units["train"]] + synth.sample_texts(500))
    summary = {"device": args.device, "spec": json.loads(args.spec), "levels": {}}
    enc = None
    for level in args.levels.split(","):
        model_dir = build_level(work / level, SHAPES[level], tokenizer, spec.image_size, seed=args.seed)
        if enc is None:  # every level shares the tokenizer and image processor: encode once
            _, processor = load_model_dir(model_dir)
            enc = {s: encode_units(u, processor) for s, u in units.items()}
        print(f"== {level}: {len(units['train'])} train units, lr {lrs[level]}", flush=True)
        summary["levels"][level] = curve(model_dir, enc["train"], enc["val"], args.steps, args.batch,
                                         float(lrs[level]), args.eval_every, args.device, args.seed, spec,
                                         args.pretrain_steps, args.pretrain_lr)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "learnability.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
