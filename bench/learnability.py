"""Does each tiny level learn the procedural benchmark, and does distillation close the gap? In-process.

Same models, prompts (one forward per record) and losses as the pipeline's stages, without Ray, on CPU or CUDA;
used to choose the tiny shapes, schedules and the generator's difficulty. Per seed: every level gets grounding
pre-training, then direct tuning on the labelled split (validation macro-F1 every `--eval-every` steps); with
`--distill S:L`, the pre-trained S is also trained with CE on the labelled split plus KD from the trained L on
`--unlabeled` fresh records that carry no label (and, as the honest baselines, with L's hard decisions on them
instead: `pseudo`, and with their true labels: `gold`). Prints one JSON line per evaluation and a summary.

    python bench/learnability.py --levels L,S --pretrain-steps 600 --steps 1500 --distill S:L --unlabeled 4000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from workers import grounding, synth
from workers.data import load_jsonl
from workers.losses import cross_entropy, forward_kl
from workers.metrics import binary_metrics
from workers.models import LevelShape, build_level, build_tokenizer, count_parameters, label_word_ids, load_model_dir
from workers.inference import position_logits, target_token_ids, to_device
from workers.prompts import collate_records, encode_records, record_units
from workers.optim import lr_at

DIMS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vision_hidden", "vision_depth", "vision_heads")
SHAPES = {
    "L": LevelShape(**dict(zip(DIMS, (256, 4, 4, 2, 704, 192, 2, 3)))),
    "M": LevelShape(**dict(zip(DIMS, (128, 2, 2, 1, 352, 96, 1, 2)))),
    "S": LevelShape(**dict(zip(DIMS, (64, 1, 2, 1, 176, 48, 1, 2)))),
}
AUTOCAST = {"device_type": "cuda", "dtype": torch.bfloat16}


def encode(records: list[dict], processor, chunk: int = 256) -> dict[str, np.ndarray]:
    """Encoded record units (one row per record), in chunks to bound memory."""
    units = record_units(records)
    parts = [encode_records(units[i:i + chunk], processor) for i in range(0, len(units), chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def rows(enc: dict[str, np.ndarray], idx: np.ndarray, pad_id: int, image_id: int, device: str) -> dict:
    return to_device(collate_records({k: v[idx] for k, v in enc.items()}, pad_id, image_id), device)


def pretrain(model, processor, spec: synth.SynthSpec, steps: int, batch_size: int, lr: float, device: str,
             seed: int) -> float:
    """Grounding pre-training on fresh scenes (workers/grounding.py); returns the last description loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        scenes = synth.random_scenes(seed * 1_000_003 + step, batch_size, spec)
        batch = to_device(grounding.collate(grounding.encode_scenes(scenes, processor), pad_id, image_id), device)
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, steps, max(1, steps // 20))
        with torch.autocast(**AUTOCAST, enabled=device.startswith("cuda")):
            loss = grounding.grounding_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return round(loss.item(), 4)


@torch.no_grad()
def evaluate(model, val: dict, types: np.ndarray, label_ids, pad_id: int, image_id: int, device: str) -> dict:
    """Macro-F1 per task and their mean, plus accuracy per option/claim type."""
    model.eval()
    probs, targets, tasks = [], [], []
    for i in range(0, len(val["uid"]), 256):
        b = rows(val, np.arange(i, min(i + 256, len(val["uid"]))), pad_id, image_id, device)
        with torch.autocast(**AUTOCAST, enabled=device.startswith("cuda")):
            logits = position_logits(model, b)
        probs.append(torch.softmax(logits[:, list(label_ids)], -1)[:, 0].cpu().numpy())
        targets.append(b["target"].cpu().numpy())
        tasks += b["row_task"]
    model.train()
    prob, target, tasks = np.concatenate(probs), np.concatenate(targets), np.array(tasks)
    out = {f"{t[:4]}_f1": round(binary_metrics(target[tasks == t], prob[tasks == t])["f1"], 4)
           for t in sorted(set(tasks.tolist()))}
    out["f1"] = round(float(np.mean(list(out.values()))), 4)
    correct = (prob >= 0.5) == (target == 1)
    out["by_type"] = {t: round(float(correct[types == t].mean()), 3) for t in sorted(set(types.tolist()))}
    return out


def position_types(records: list[dict]) -> np.ndarray:
    """One type label per supervised position: Task 1 option type (or 'true'), Task 2 claim type (+'-hard')."""
    out = []
    for r in records:
        if r["task"] == "hallucination":
            out += [f"h:{f['type']}" for f in r["facts"]]
        else:
            out.append(f"f:{r['facts']['type']}{'-hard' if r['facts']['hard'] else ''}")
    return np.array(out)


def train(model, data: dict, steps: int, batch: int, lr: float, device: str, seed: int, evaluate_fn,
          eval_every: int, teacher=None, unlabeled: dict | None = None, mode: str = "direct",
          temperature: float = 2.0, label_ids=(0, 1), pad_id: int = 0, image_id: int = 0) -> list[dict]:
    """Direct tuning (CE on labelled records) or, with a teacher, CE + KD on labelled records plus a term on
    unlabelled ones: `kd` (the teacher's soft answers), `pseudo` (CE on its hard decisions), `gold` (CE on
    their true labels). Returns the evaluation points."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    cast = dict(**AUTOCAST, enabled=device.startswith("cuda"))
    points, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        b = rows(data, rng.integers(0, len(data["uid"]), batch), pad_id, image_id, device)
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, steps, max(1, steps // 20))
        with torch.autocast(**cast):
            logits = position_logits(model, b)
            loss = cross_entropy(logits, target_token_ids(b["target"], label_ids))
            if teacher is not None:
                with torch.no_grad():
                    t_logits = position_logits(teacher, b)
                loss = 0.5 * loss + 0.5 * forward_kl(logits, t_logits, temperature=temperature)
                u = rows(unlabeled, rng.integers(0, len(unlabeled["uid"]), batch), pad_id, image_id, device)
                u_logits = position_logits(model, u)
                if mode == "gold":
                    loss = loss + cross_entropy(u_logits, target_token_ids(u["target"], label_ids))
                else:
                    with torch.no_grad():
                        tu = position_logits(teacher, u)
                    if mode == "kd":
                        loss = loss + forward_kl(u_logits, tu, temperature=temperature)
                    else:
                        hard = (tu[:, label_ids[0]] > tu[:, label_ids[1]]).long()
                        loss = loss + cross_entropy(u_logits, target_token_ids(hard, label_ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            point = {"step": step + 1, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - start, 1),
                     **evaluate_fn(model)}
            points.append(point)
            print(json.dumps({"mode": mode, **point}), flush=True)
    return points


def parse_spec(text: str) -> synth.SynthSpec:
    return synth.SynthSpec(**{k: tuple(map(tuple, v)) if isinstance(v, list) and v and isinstance(v[0], list)
                              else tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--levels", default="L,M,S")
    p.add_argument("--shape", action="append", default=[], help="LEVEL=hidden,layers,heads,kv,inter,vh,vd,vheads")
    p.add_argument("--steps", type=int, default=1000, help="task steps per level (and per distillation run)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=str, default="L=1e-3,M=2e-3,S=3e-3")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--train", type=int, default=1000, help="labelled records per task")
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--unlabeled", type=int, default=0, help="unlabelled records per task for --distill")
    p.add_argument("--distill", default="", help="STUDENT:TEACHER, e.g. S:L")
    p.add_argument("--modes", default="kd,pseudo,gold")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--spec", default="{}", help="SynthSpec fields as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0, help="grounding pre-training steps first")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--name", default="learnability")
    p.add_argument("--eval-train", action="store_true", help="also score the labelled training records")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for item in args.shape:
        level, dims = item.split("=")
        SHAPES[level] = LevelShape(**dict(zip(DIMS, map(int, dims.split(",")))))
    lrs = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(","))}
    spec = parse_spec(args.spec)
    work = Path(tempfile.mkdtemp(prefix="learn-"))
    synth.generate(work / "data", seed=args.seed, n_train=args.train, n_val=args.val, n_test=1, spec=spec)
    records = {s: [r for t in synth.TASKS for r in load_jsonl(work / "data" / t / f"{s}.jsonl")]
               for s in ("train", "val")}
    if args.unlabeled:
        synth.generate(work / "unlab", seed=10_000 + args.seed, n_train=args.unlabeled, n_val=1, n_test=1, spec=spec)
        records["unlabeled"] = [r for t in synth.TASKS for r in load_jsonl(work / "unlab" / t / "train.jsonl")]
    units = record_units(records["train"])
    tokenizer = build_tokenizer([u["text"] + u["answer"] for u in units] + synth.sample_texts(500, spec=spec))
    types, train_types = position_types(records["val"]), position_types(records["train"])
    summary = {"args": vars(args), "levels": {}, "distill": {}}
    enc, trained, pretrained = None, {}, {}
    t0 = time.perf_counter()
    for level in dict.fromkeys(args.levels.split(",") + ([args.distill.split(":")[0]] if args.distill else [])):
        model_dir = build_level(work / level, SHAPES[level], tokenizer, spec.image_size, seed=args.seed)
        model, processor = load_model_dir(model_dir, device=args.device)
        if enc is None:  # every level shares the tokenizer and image processor: encode once
            enc = {s: encode(r, processor) for s, r in records.items()}
            print(json.dumps({"encoded_s": round(time.perf_counter() - t0, 1),
                              "positions": {s: int(sum(len(t) for t in e["targets"])) for s, e in enc.items()}}))
        label_ids = label_word_ids(processor.tokenizer)
        ids = dict(label_ids=label_ids, pad_id=processor.tokenizer.pad_token_id, image_id=model.config.image_token_id)

        def evaluate_fn(m):
            out = evaluate(m, enc["val"], types, ids["label_ids"], ids["pad_id"], ids["image_id"], args.device)
            if args.eval_train:  # train ≫ val means the level memorises records instead of reading images
                train = evaluate(m, enc["train"], train_types, ids["label_ids"], ids["pad_id"], ids["image_id"],
                                 args.device)
                out.update({f"train_{k}": v for k, v in train.items() if k != "by_type"})
            return out

        torch.manual_seed(args.seed)
        t = time.perf_counter()
        gloss = pretrain(model, processor, spec, args.pretrain_steps, args.batch, args.pretrain_lr, args.device,
                         args.seed) if args.pretrain_steps else None
        print(json.dumps({"level": level, "params": count_parameters(model), "pretrain_loss": gloss,
                          "pretrain_s": round(time.perf_counter() - t, 1)}), flush=True)
        pretrained[level] = copy.deepcopy(model.state_dict())
        if level in args.levels.split(","):
            curve = train(model, enc["train"], args.steps, args.batch, lrs[level], args.device, args.seed,
                          evaluate_fn, args.eval_every, **ids)
            trained[level] = model
            summary["levels"][level] = {"params": count_parameters(model), "pretrain_loss": gloss, "curve": curve}
    if args.distill:
        student, teacher = args.distill.split(":")
        trained[teacher].eval()
        for mode in args.modes.split(","):
            model, processor = load_model_dir(work / student, device=args.device)
            model.load_state_dict(pretrained[student])
            torch.manual_seed(args.seed)
            summary["distill"][mode] = train(model, enc["train"], args.steps, args.batch, lrs[student], args.device,
                                             args.seed, evaluate_fn, args.eval_every, teacher=trained[teacher],
                                             unlabeled=enc["unlabeled"], mode=mode,
                                             temperature=args.temperature, **ids)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))


if __name__ == "__main__":
    main()
