"""The teacher/student pair the CPU benches share: a small benchmark and two tiny levels over one tokenizer."""

from __future__ import annotations

from pathlib import Path

from workers import synth
from workers.data import load_jsonl
from workers.models import LevelShape, build_level, build_tokenizer
from workers.prompts import record_units

TEACHER = LevelShape(256, 4, 4, 2, 704, 192, 2, 3)
STUDENT = LevelShape(128, 2, 2, 1, 352, 96, 1, 2)


def tiny_pair(work: Path, n_units: int) -> tuple[list[dict], Path, Path]:
    """Record units (one forward each; at least `n_units`) and the teacher and student model dirs, built under
    `work`."""
    synth.generate(work / "data", seed=0, n_train=n_units // 2 + 8, n_val=1, n_test=1)
    records = [r for t in synth.TASKS for r in load_jsonl(work / "data" / t / "train.jsonl")]
    units = record_units(records)
    tokenizer = build_tokenizer([u["text"] + u["answer"] for u in units] + synth.sample_texts(200))
    return units, build_level(work / "teacher", TEACHER, tokenizer, 112), build_level(work / "student", STUDENT, tokenizer, 112)
