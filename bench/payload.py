"""What the teacher wire format costs and saves: bytes per supervised token and top-k KL error.

Full-vocabulary fp32 logits are 4·V bytes per token (≈600 kB at Qwen's width); the teacher actors send
top-k log-probs + ids + a tail bucket + two label logits instead. This measures both on real teacher
logits of a small synthetic benchmark and how far the bucketed KL (`topk_forward_kl`) is from the full
`forward_kl` for a student, so the choice of k rests on numbers. A random-init teacher is close to
uniform (top-k holds little mass), the worst case for top-k; pass a trained teacher with --model-dir.

    python bench/payload.py [--model-dir DIR] [--units 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from orchestrator.cluster.machine import describe, probe  # noqa: E402
from workers.data import synth  # noqa: E402
from workers.losses import forward_kl, topk_forward_kl  # noqa: E402
from workers.models.families import load_processor  # noqa: E402
from workers.models.model_dirs import (LevelShape, build_level, build_tokenizer, label_word_ids,  # noqa: E402
                            load_model_dir)
from workers.models.prompts import collate_records, encode_records, record_units  # noqa: E402
from workers.teachers.outputs import from_wire, wire_outputs  # noqa: E402
from workers.inference.logits import position_logits  # noqa: E402

KS = (4, 16, 64)
TEMPERATURES = (1.0, 4.0)
QWEN_LOGITS_WIDTH = 152_064  # Qwen2.5-VL's lm_head width (config vocab_size): what full logits would ship
TEACHER = LevelShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vision_hidden=64,
                     vision_depth=2, vision_heads=2)
STUDENT = LevelShape(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128, vision_hidden=32,
                     vision_depth=1, vision_heads=2)
IMAGE_SIZE = 112
VOCAB = 4096


def pickled_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Size of a dict of arrays as Ray serializes it (pickle protocol 5)."""
    return len(pickle.dumps(arrays, protocol=5))


@torch.no_grad()
def logits_on(model_dir: Path, batches: list[dict]) -> torch.Tensor:
    model, _ = load_model_dir(model_dir)
    return torch.cat([position_logits(model.eval(), b) for b in batches])


def build(work: Path, model_dir: Path | None, n_units: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Teacher and student logits [P, V] at the supervised positions of n_units synthetic records, and the label
    ids."""
    synth.generate(work / "data", seed=0, n_train=max(8, n_units // 2), n_val=0, n_test=0)
    records = [json.loads(line) for t in synth.TASKS for line in (work / "data" / t / "train.jsonl").open()]
    for rec in records:
        rec["image"] = str(work / "data" / rec["task"] / rec["image"])
    units = record_units(records)[:n_units]
    if model_dir is None:
        tok = build_tokenizer([u["text"] + u["answer"] for u in units] + synth.sample_texts(50), vocab_size=VOCAB)
        model_dir = build_level(work / "teacher", TEACHER, tok, IMAGE_SIZE, seed=0)
    processor = load_processor(model_dir)
    tok = processor.tokenizer
    student_dir = build_level(work / "student", STUDENT, tok, IMAGE_SIZE, seed=1)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    batches = [collate_records(encode_records(units[i:i + 16], processor), tok.pad_token_id, image_id)
               for i in range(0, len(units), 16)]
    return logits_on(model_dir, batches), logits_on(student_dir, batches), label_word_ids(tok)


def measure(teacher: torch.Tensor, student: torch.Tensor, label_ids: tuple[int, int]) -> dict:
    """Bytes per token for full logits and each k, and bucketed-vs-full KL error per (k, T).

    Relative error is mean |Δ| / mean full KL (stable when single rows have KL ≈ 0). Bucketing can
    only lower KL (data-processing inequality), so the top-k loss underestimates the full one.
    """
    n, vocab = teacher.shape
    full = pickled_bytes({"logits": teacher.numpy()}) / n
    qwen_full = pickled_bytes({"logits": np.zeros((n, QWEN_LOGITS_WIDTH), np.float32)}) / n
    rows = []
    for k in KS:
        wire = wire_outputs(teacher, label_ids, k, 1.0)
        per_token = pickled_bytes(wire) / n
        row = {"k": k, "bytes_per_token": per_token, "raw_bytes_per_token": sum(a.nbytes for a in wire.values()) / n,
               "ratio_to_full": per_token / full, "ratio_to_qwen_full": per_token / qwen_full}
        for t in TEMPERATURES:
            out = from_wire(wire_outputs(teacher, label_ids, k, t))
            approx = topk_forward_kl(student, out.topk_logprobs, out.topk_ids, out.tail_logprob, t,
                                     reduction="none")
            exact = forward_kl(student, teacher, t, reduction="none")
            mae = (approx - exact).abs().mean().item()
            row[f"T{t:g}"] = {"topk_mass": out.topk_logprobs.float().logsumexp(-1).exp().mean().item(),
                              "kl_full": exact.mean().item(), "mae": mae, "rel": mae / exact.mean().item()}
        rows.append(row)
    return {"units": n, "vocab": vocab, "full_bytes_per_token": full, "qwen_full_bytes_per_token": qwen_full,
            "rows": rows}


def print_table(res: dict) -> None:
    print(f"{res['units']} units, vocab {res['vocab']}: full fp32 logits {res['full_bytes_per_token']:,.0f} B/token "
          f"(at Qwen2.5-VL width {QWEN_LOGITS_WIDTH:,}: {res['qwen_full_bytes_per_token']:,.0f} B/token)")
    head = f"{'k':>4} {'B/token':>8} {'raw B':>6} {'/full':>8} {'/qwen':>9}"
    for t in TEMPERATURES:
        head += f" | T={t:g}: {'mass':>6} {'KL':>8} {'MAE':>9} {'rel':>7}"
    print(head)
    for r in res["rows"]:
        line = (f"{r['k']:>4} {r['bytes_per_token']:>8.1f} {r['raw_bytes_per_token']:>6.0f} "
                f"{r['ratio_to_full']:>8.4f} {r['ratio_to_qwen_full']:>9.6f}")
        for t in TEMPERATURES:
            m = r[f"T{t:g}"]
            line += f" | {'':>5}{m['topk_mass']:>6.3f} {m['kl_full']:>8.4f} {m['mae']:>9.2e} {m['rel']:>7.3f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, help="teacher model dir (default: build a small random one)")
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    print(describe(probe()), file=sys.stderr if args.json else sys.stdout, flush=True)  # stdout stays JSON
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        teacher, student, label_ids = build(Path(tmp), args.model_dir, args.units)
    res = measure(teacher, student, label_ids)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        print_table(res)
        print(f"({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
