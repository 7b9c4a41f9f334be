"""The teacher/student pair the CPU benches share: a small benchmark and two tiny levels over one tokenizer."""

from __future__ import annotations

from pathlib import Path

from workers.data import synth
from workers.data.records import load_jsonl
from workers.models.model_dirs import LevelShape, build_level
from workers.models.prompts import record_units
from workers.models.vocab import fixed_tokenizer

TEACHER = LevelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, vision_hidden=192, vision_depth=2,
                     vision_heads=3)
STUDENT = LevelShape(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=352, vision_hidden=96, vision_depth=1,
                     vision_heads=2)


def tiny_pair(work: Path, n_units: int) -> tuple[list[dict], Path, Path]:
    """Record units (one forward each; at least `n_units`) and the teacher and student model dirs, built under
    `work`."""
    synth.generate(work / "data", seed=0, n_train=n_units // 2 + 8, n_val=1, n_test=1)
    records = [r for t in synth.TASKS for r in load_jsonl(work / "data" / t / "train.jsonl")]
    units = record_units(records)
    tokenizer = fixed_tokenizer()
    return units, build_level(work / "teacher", TEACHER, tokenizer, 112), build_level(work / "student", STUDENT, tokenizer, 112)
