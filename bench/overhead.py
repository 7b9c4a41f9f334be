"""What does Ray orchestration cost? Steady-state distillation samples/s, Ray vs one process.

Ray: a teacher actor (1 CPU) and a Ray Train worker (1 CPU) fed by Ray Data, through `fit_stage` — the code
`hkd run` uses. In-process: the same teacher and student models in this process (2 threads), teacher forward
then student step on each batch, no Ray. Same data, batch size, loss (CE + top-k KD at T=4).

    python bench/overhead.py [--steps 40] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
import ray.data
import torch

from orchestrator.config.schema import Resources, RunConfig, TrainConfig
from orchestrator.cluster.machine import describe, probe
from orchestrator.run.kinds import PPOD, StagePlan
from orchestrator.run.stages import default_stage_loss, fit_stage, stage_job, train_datasets
from tiny_pair import tiny_pair  # bench/ is on sys.path when run as a script
from workers.losses import teacher_topk
from workers.models.model_dirs import label_word_ids, load_model_dir
from workers.models.prompts import collate_records, encode_records
from workers.contract import OutputKind
from workers.teachers.outputs import TeacherOutput
from workers.teachers.pool import TeacherPool
from workers.inference.logits import position_logits
from workers.training.objectives import StageObjective

K, T = 16, 4.0


def in_process(teacher_dir: Path, student_dir: Path, units: list[dict], batch: int, steps: int) -> float:
    torch.set_num_threads(2)
    teacher, _ = load_model_dir(teacher_dir)
    teacher.eval().requires_grad_(False)
    student, processor = load_model_dir(student_dir)
    label_ids = label_word_ids(processor.tokenizer)
    pad, img = processor.tokenizer.pad_token_id, student.config.image_token_id
    batches = [collate_records(encode_records(units[i:i + batch], processor), pad, img)
               for i in range(0, steps * batch, batch)]
    loss_fn = StageObjective(default_stage_loss([{"stage": "T", "pool": "local", "temperature": T}], ce_weight=0.5),
                             label_ids)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    start = None
    for i, b in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        with torch.no_grad():
            logits = position_logits(teacher, b)
            lp, ids, tail = teacher_topk(logits, K, T)
        out = TeacherOutput(OutputKind.TOP_K, logits[:, list(label_ids)].float(), lp, ids, tail)
        loss, _ = loss_fn(position_logits(student, b), b["target"], [out])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * (len(batches) - 2) / (time.perf_counter() - start)


def with_ray(work: Path, teacher_dir: Path, student_dir: Path, units: list[dict], batch: int, steps: int) -> float:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    _, processor = load_model_dir(student_dir)
    ds = ray.data.from_items(units[:steps * batch]).map_batches(
        encode_records, fn_kwargs={"processor": processor}, batch_size=64, batch_format="numpy").materialize()
    val = ray.data.from_items(units[:batch]).map_batches(
        encode_records, fn_kwargs={"processor": processor}, batch_size=64, batch_format="numpy").materialize()
    pool = TeacherPool.start("overhead", teacher_dir, replicas=1, num_cpus=1, threads=1)
    loss = default_stage_loss([{"stage": "T", "pool": "overhead", "replicas": 1, "temperature": T}], ce_weight=0.5,
                              k=K, prefetch=2)
    res = Resources(num_workers=1, cpus_per_worker=1)
    cfg = RunConfig(levels={"S": {}}, direct={"levels": ["S"]}, resources=res)
    plan = StagePlan("overhead", "S", PPOD, None, TrainConfig(epochs=1, batch_size=batch, log_every=1000))
    sets = train_datasets(ds, None)
    job = stage_job(cfg, plan, student_dir, work / "out", loss, sets, ds.count(), None)
    val_metrics = fit_stage("overhead", job, sets, val, res, work / "ray")
    pool.shutdown()
    ray.shutdown()
    return val_metrics["train_samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    print(describe(probe()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    units, teacher_dir, student_dir = tiny_pair(work, args.steps * args.batch)
    local = in_process(teacher_dir, student_dir, units, args.batch, args.steps)
    orchestrated = with_ray(work, teacher_dir, student_dir, units, args.batch, args.steps)
    print(f"in-process {local:.1f} samples/s, Ray (actor + TorchTrainer) {orchestrated:.1f} samples/s, "
          f"ratio Ray / in-process = {orchestrated / local:.2f}")
    print(json.dumps({"in_process": local, "ray": orchestrated, "ratio": orchestrated / local}))


if __name__ == "__main__":
    main()
