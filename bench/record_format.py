"""Decisions per second: one forward per record (the product's format) vs one prompt per option (the format it
replaced), same model, same Task 1 records, one run.

New: `record_units` → `encode_records` → `collate_records` → `position_logits` (a Task 1 record's options in one
sequence, one supervised position each). Old, reconstructed here as measurement code only: one prompt per option
("Caption: …\\nPhrase: <option>\\nIs the phrase hallucinated?", read at the last prompt token), built as record
units with an empty answer so the same encode/collate/forward code runs it. Task 2 is one prompt per record in
both formats, so only Task 1 is timed. Both formats run forwards of `--batch` sequences, after one warm-up batch;
the time covers the forwards only (encoding is the same per-token work done in Ray Data ahead of the model).

    python bench/record_format.py [--records 48] [--batch 16] [--threads 2] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.tiny_pair import TEACHER  # noqa: E402
from orchestrator.cluster.machine import describe, probe  # noqa: E402
from workers.data import synth  # noqa: E402
from workers.data.records import load_jsonl  # noqa: E402
from workers.inference.logits import position_logits, to_device  # noqa: E402
from workers.models.model_dirs import build_level, build_tokenizer, load_model_dir  # noqa: E402
from workers.models.prompts import collate_records, encode_records, record_units  # noqa: E402

IMAGE_SIZE = 112


def per_option_units(records: list[dict]) -> list[dict]:
    """The replaced format, one unit per option, as units `encode_records` reads (empty answer: the supervised
    position is the last prompt token; task "factuality", the task `encode_records` reads at the last token,
    where Task 1 units are read at their option markers)."""
    return [{"uid": f"{r['id']}#{i}", "record_id": r["id"], "task": "factuality", "image": r["image"],
             "text": f"Caption: {r['caption']}\nPhrase: {o}\nIs the phrase hallucinated?", "answer": "",
             "targets": [int(r["hallucinated"][i])]}
            for r in records for i, o in enumerate(r["options"])]


@torch.no_grad()
def decisions_per_s(model, batches: list[dict], device: str) -> tuple[float, int]:
    """Supervised positions scored per second over `batches` (the first one is a warm-up), and their count."""
    model.eval()
    position_logits(model, to_device(batches[0], device))
    decisions, start = 0, time.perf_counter()
    for batch in batches[1:]:
        position_logits(model, to_device(batch, device))
        decisions += len(batch["positions"])
    if device == "cuda":
        torch.cuda.synchronize()
    return decisions / (time.perf_counter() - start), decisions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=48, help="Task 1 records timed (after one warm-up batch)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward, both formats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    print(describe(probe()), file=sys.stderr if args.json else sys.stdout, flush=True)  # stdout stays JSON
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="record-format-") as tmp:
        work = Path(tmp)
        synth.generate(work / "data", seed=0, n_train=args.records + args.batch, n_val=1, n_test=1,
                       spec=synth.SynthSpec(image_size=IMAGE_SIZE))
        records = load_jsonl(work / "data" / "hallucination" / "train.jsonl")
        old, new = per_option_units(records), record_units(records)
        tokenizer = build_tokenizer([u["text"] + u["answer"] for u in old + new] + synth.sample_texts(200))
        model, processor = load_model_dir(build_level(work / "model", TEACHER, tokenizer, IMAGE_SIZE))
        model.to(args.device)
        pad, img = processor.tokenizer.pad_token_id, model.config.image_token_id

        def batches(units: list[dict]) -> list[dict]:
            return [collate_records(encode_records(units[i:i + args.batch], processor), pad, img)
                    for i in range(0, len(units), args.batch)]

        old_batches, new_batches = batches(old), batches(new)
        tokens = {name: sum(int(b["attention_mask"].sum()) for b in bs) / sum(len(b["positions"]) for b in bs)
                  for name, bs in (("old", old_batches), ("new", new_batches))}
        old_rate, old_n = decisions_per_s(model, old_batches, args.device)
        new_rate, new_n = decisions_per_s(model, new_batches, args.device)
    res = {"device": args.device, "threads": args.threads, "batch": args.batch, "records": len(records),
           "options_per_record": len(old) / len(records), "old_decisions_per_s": old_rate,
           "new_decisions_per_s": new_rate, "ratio_new_over_old": new_rate / old_rate,
           "tokens_per_decision": tokens, "decisions_timed": {"old": old_n, "new": new_n},
           "load_1min": os.getloadavg()[0]}
    print(f"Task 1, {res['options_per_record']:.2f} options/record, batch {args.batch} sequences, {args.device}, "
          f"{args.threads} threads, 1-min load {res['load_1min']:.1f}")
    print(f"  one prompt per option (old): {old_rate:8.1f} decisions/s, {tokens['old']:.1f} tokens/decision")
    print(f"  one forward per record (new): {new_rate:8.1f} decisions/s, {tokens['new']:.1f} tokens/decision")
    print(f"  ratio new / old = {res['ratio_new_over_old']:.2f}")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
