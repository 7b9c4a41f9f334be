"""Does asking for batch i+1's teacher outputs before step i hide teacher latency?

Runs the same distillation steps (student in this process, one thread; teacher in a Ray actor, one thread —
separate CPU shares) with prefetch depth 0 and with depth 1 and 2, through the training loop's own
`TeacherRequests` + `StageObjective`, and prints step time / max(teacher time, student time) for each: 1.0 is perfect overlap,
(teacher + student) / max(...) is none.

    python bench/overlap.py [--steps 30] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
import torch

from tiny_pair import tiny_pair  # bench/ is on sys.path when run as a script
from workers.models.model_dirs import label_word_ids, load_model_dir
from workers.models.prompts import collate_records, encode_records
from workers.teachers.outputs import from_wire
from workers.teachers.pool import TeacherPool, to_numpy_inputs
from orchestrator.cluster.machine import describe, probe
from orchestrator.run.stages import default_stage_loss
from workers.inference.logits import position_logits
from workers.training.objectives import StageObjective
from workers.teachers.requests import TeacherRequests



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    print(describe(probe()), flush=True)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="overlap-"))
    units, teacher_dir, student_dir = tiny_pair(work, args.steps * args.batch)
    model, processor = load_model_dir(student_dir)
    pad, img = processor.tokenizer.pad_token_id, model.config.image_token_id
    batches = [collate_records(encode_records(units[i:i + args.batch], processor), pad, img)
               for i in range(0, args.steps * args.batch, args.batch)]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = TeacherPool.start("overlap", teacher_dir, replicas=1, num_cpus=1, threads=1)
    label_ids = label_word_ids(processor.tokenizer)
    ray.get(pool.submit(to_numpy_inputs(batches[0]), 16, 4.0))  # warm-up
    t0 = time.perf_counter()
    cached = [[from_wire(ray.get(pool.submit(to_numpy_inputs(b), 16, 4.0)))] for b in batches]
    teacher_s = (time.perf_counter() - t0) / len(batches)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = {"teacher_s": teacher_s}
    for depth in (None, 0, 1, 2):  # None: student alone, on cached teacher outputs
        cfg = default_stage_loss([{"stage": "T", "pool": "overlap", "replicas": 1, "temperature": 4.0}],
                                 ce_weight=0.5, k=16, prefetch=depth or 0)
        loss_fn, requests = StageObjective(cfg, label_ids), TeacherRequests(cfg)
        pairs = zip(batches, cached) if depth is None else requests.with_teacher_outputs(batches)
        t0 = time.perf_counter()
        for b, pending in pairs:
            outs = pending if depth is None else requests.wait(pending)[0]
            loss, _ = loss_fn(position_logits(model, b), b["target"], outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows["student_s" if depth is None else f"prefetch_{depth}"] = (time.perf_counter() - t0) / len(batches)
    student_s = rows["student_s"]
    pool.shutdown()
    ray.shutdown()

    bound = max(teacher_s, student_s)
    print(f"teacher {teacher_s * 1e3:.0f} ms/batch, student {student_s * 1e3:.0f} ms/step "
          f"(no overlap would be {(teacher_s + student_s) / bound:.2f}x max)")
    for depth in (0, 1, 2):
        step = rows[f"prefetch_{depth}"]
        print(f"prefetch {depth}: {step * 1e3:.0f} ms/step, step / max(teacher, student) = {step / bound:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
