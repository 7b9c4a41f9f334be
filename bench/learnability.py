"""Does each level learn the procedural benchmark? Direct tuning curves, in process, by `hkd run`'s own code.

Each level's direct stage is the one `hkd run` trains (`orchestrator.run.stages.stage_job` of the config's plan: its
objective, `workers.training.objectives.StageObjective`, its training settings and seeds, the data in the pipeline's order:
records interleaved by task, shuffled per epoch by the loop), run with `workers.training.loop.run_in_process`: the
Ray Train loop itself, without Ray; so a curve here is the curve `hkd run` logs. Used to choose shapes, schedules
and the generator's difficulty. Levels come from `--base-dir` (the shipped bases, pretrained by `hkd pretrain`)
or, without it, are tiny random-init levels built as `hkd run` builds them (`--shape`); or all from `--config`,
a run config whose direct stages run here (its flags below override it; augmentation, grounding pre-training
and the distillation stages are not run here). Prints one JSON line per validation point (the mean training
loss since the previous one, validation macro-F1 per task and their mean) and a summary with each level's final
accuracy per option/claim type.

Distillation is not measured here: its stages need the teachers in Ray actors. `bench/claim.py --from-run`
measures it (distilled S against directly tuned S, over seeds) through `hkd run`'s own code.

    python bench/learnability.py --base-dir bases/tiny-qwen2_5_vl-84px --levels M,S --steps 300 --eval-every 50
    python bench/learnability.py --config configs/quickstart.yaml --levels S
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

from orchestrator.config.schema import RunConfig, read_raw, validate_raw
from orchestrator.cluster.machine import describe, probe
from orchestrator.run.pairs import RunInputs
from orchestrator.run.levels import init_levels, model_dir
from orchestrator.run.inputs import load_splits
from orchestrator.run.kinds import plan_stages
from orchestrator.run.stages import stage_job, stage_loss
from orchestrator.run.unlabeled import by_task, spread
from workers.inference.logits import predict, to_device
from workers.models.model_dirs import count_parameters, label_word_ids, load_model_dir
from workers.models.prompts import collate_records, encode_with, prefixed, record_units
from workers.training.context import ColumnDataset
from workers.training.loop import evaluate_rank0, run_in_process

DIMS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vision_hidden", "vision_depth", "vision_heads")
SHAPES = {
    "L": dict(zip(DIMS, (256, 4, 4, 2, 704, 192, 2, 3))),
    "M": dict(zip(DIMS, (128, 2, 2, 1, 352, 96, 1, 2))),
    "S": dict(zip(DIMS, (64, 1, 2, 1, 176, 48, 1, 2))),
}
DEFAULTS = {"levels": "L,M,S", "steps": 1000, "batch": 32, "lr": "L=1e-3,M=2e-3,S=3e-3", "eval_every": 250,
            "train": 1000, "val": 300, "threads": 2}


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run config whose direct stages run: `--config` (or the defaults above) with the flags given."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    raw = read_raw(Path(args.config)) if args.config else {"name": "learnability", "vocab_size": 1024}
    if not args.config:
        given = {**DEFAULTS, **given}
    levels = given.get("levels", ",".join(raw.get("direct", {}).get("levels", []))).split(",")
    if args.base_dir:
        raw["levels"] = {lv: {"path": str(Path(args.base_dir) / lv)} for lv in levels}
        card = json.loads((Path(args.base_dir) / levels[0] / "card.json").read_text())
        raw.setdefault("data", {}).setdefault("synth", {}).setdefault("image_size", card["config"]["image_size"])
    elif not args.config:
        raw["levels"] = {lv: SHAPES[lv] for lv in levels}
    for item in args.shape:
        level, dims = item.split("=")
        raw["levels"][level] = dict(zip(DIMS, map(int, dims.split(","))))
    data = raw.setdefault("data", {"source": "synth"})
    synth = data.setdefault("synth", {})
    synth.update({k: given[k] for k in ("train", "val") if k in given}, test=1, unlabeled=0)
    spec = json.loads(args.spec)
    synth.update({k: spec.pop(k) for k in ("image_size", "min_objects", "max_objects") if k in spec})
    synth["spec"] = {**synth.get("spec", {}), **spec}
    direct = raw.setdefault("direct", {})
    direct["levels"] = levels
    train = direct.setdefault("train", {})
    if "batch" in given:
        train["batch_size"] = given["batch"]
    if "eval_every" in given:
        train["eval_every"] = given["eval_every"]
    train["log_every"] = 1  # every step's loss reaches the curve
    if "lr" in given:
        for lv, lr in (item.split("=") for item in given["lr"].split(",")):
            if lv in levels:
                direct.setdefault("overrides", {}).setdefault(lv, {})["lr"] = float(lr)
    if "seed" in given:
        raw["seed"] = given["seed"]
    if "threads" in given:
        raw["resources"] = {**raw.get("resources", {}), "cpus_per_worker": given["threads"]}
    raw.update(ppod={"enabled": False}, tcrd={"enabled": False}, pretrain={"enabled": False},
               augment={"enabled": False})
    return validate_raw(raw, args.config or "learnability")


def position_types(records: list[dict]) -> np.ndarray:
    """One type label per supervised position: Task 1 option type (or 'true'), Task 2 claim type (+'-hard')."""
    out = []
    for r in records:
        if r["task"] == "hallucination":
            out += [f"h:{f['type']}" for f in r["facts"]]
        else:
            out.append(f"f:{r['facts']['type']}{'-hard' if r['facts']['hard'] else ''}")
    return np.array(out)


def by_type(out_dir: Path, columns: dict, types: np.ndarray, batch: int, prefix: str, device: str) -> dict:
    """Accuracy per option/claim type of a trained level (decision at P(positive) >= 0.5)."""
    model, processor = load_model_dir(out_dir, device=device)
    pad, image = processor.tokenizer.pad_token_id, model.config.image_token_id
    batches = (to_device(collate_records(prefixed(raw, prefix), pad, image), model.device)
               for raw in ColumnDataset(columns).iter_batches(batch_size=batch))
    pred = predict(model, batches, label_word_ids(processor.tokenizer))
    correct = (pred["prob"] >= 0.5) == (pred["target"] == 1)
    return {t: round(float(correct[types == t].mean()), 3) for t in sorted(set(types.tolist()))}


class Curve:
    """`on_log` of one stage: prints and keeps a point at each validation (mean loss since the last point)."""

    def __init__(self, level: str):
        self.level, self.losses, self.points, self.start = level, [], [], time.perf_counter()

    def __call__(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            self.losses.append(values["loss"])
        if "val/f1" in values:
            point = {"level": self.level, "step": step,
                     "loss": round(float(np.mean(self.losses)), 4) if self.losses else None,
                     "s": round(time.perf_counter() - self.start, 1), "f1": round(values["val/f1"], 4),
                     **{f"{k[4:8]}_f1": round(v, 4) for k, v in values.items() if k.endswith("/f1") and k != "val/f1"}}
            self.losses = []
            self.points.append(point)
            print(json.dumps(point), flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a run config: its direct stages, data and levels (flags override)")
    p.add_argument("--base-dir", help="levels from DIR/<level>, e.g. bases/tiny-qwen2_5_vl-84px")
    p.add_argument("--levels", help=f"direct stages to run ({DEFAULTS['levels']})")
    p.add_argument("--shape", action="append", default=[], help="LEVEL=hidden,layers,heads,kv,inter,vh,vd,vheads")
    p.add_argument("--steps", type=int, help=f"steps per level ({DEFAULTS['steps']}; with --config: its epochs)")
    p.add_argument("--batch", type=int, help=f"batch size ({DEFAULTS['batch']})")
    p.add_argument("--lr", help=f"per level ({DEFAULTS['lr']})")
    p.add_argument("--eval-every", type=int, help=f"steps between validation points ({DEFAULTS['eval_every']})")
    p.add_argument("--train", type=int, help=f"labelled records per task ({DEFAULTS['train']})")
    p.add_argument("--val", type=int, help=f"validation records per task ({DEFAULTS['val']})")
    p.add_argument("--spec", default="{}", help="SynthSpec fields as JSON")
    p.add_argument("--seed", type=int, help="the run's seed: data and training (0)")
    p.add_argument("--threads", type=int, help=f"torch threads, the worker's CPUs ({DEFAULTS['threads']})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default="learnability")
    p.add_argument("--eval-train", action="store_true", help="also score the training records at the end")
    args = p.parse_args(argv)
    print(describe(probe()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="learn-"))
    cfg = run_config(args)
    t0 = time.perf_counter()
    splits = load_splits(cfg, work)
    splits["train"] = spread(by_task(splits["train"]))  # the pipeline's training order (`encode_inputs`)
    init_dirs = init_levels(cfg, work)
    plans = [pl for pl in plan_stages(cfg) if pl.kind.name == "direct"]
    inputs = RunInputs(cfg, plans, init_dirs, first=cfg.direct.levels[0])
    columns = {s: encode_with(record_units(splits[s]), inputs.processor, inputs.also) for s in ("train", "val")}
    n_units = len(columns["train"]["uid"])
    print(json.dumps({"encoded_s": round(time.perf_counter() - t0, 1), "train_records": n_units,
                      "val_positions": int(sum(len(t) for t in columns["val"]["targets"]))}), flush=True)
    summary = {"args": vars(args), "config": cfg.model_dump(mode="json"), "levels": {}}
    for plan in plans:
        if args.steps:  # as many epochs as make `--steps` steps
            plan.train = plan.train.model_copy(update={"epochs": args.steps / max(1, n_units // plan.train.batch_size)})
        out_dir = model_dir(work, plan.name)
        job = stage_job(cfg, plan, init_dirs[plan.level], out_dir, stage_loss(cfg, plan, {}, ""), {"train": None},
                        n_units, tracking=None, inputs=inputs.prefixes[plan.level])
        curve = Curve(plan.level)
        final = run_in_process(job, {"train": columns["train"], "val": columns["val"]}, work / "storage" / plan.name,
                               args.device, on_log=curve)
        row = {"params": count_parameters(load_model_dir(out_dir)[0]), "steps": final["steps"], "curve": curve.points,
               "final": {k: v for k, v in final.items() if k.endswith("f1")},
               "by_type": by_type(out_dir, columns["val"], position_types(splits["val"]), plan.train.batch_size,
                                  job.inputs, args.device)}
        if args.eval_train:  # train ≫ val means the level memorises records instead of reading images
            model, processor = load_model_dir(out_dir, device=args.device)
            row["train"] = evaluate_rank0(model, processor, label_word_ids(processor.tokenizer),
                                          plan.train.batch_size, ColumnDataset(columns["train"]), job.inputs)
        summary["levels"][plan.level] = row
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("args", "config")}))
    return summary


if __name__ == "__main__":
    main()
