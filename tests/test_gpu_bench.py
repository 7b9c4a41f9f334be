"""`bench/gpu.py --tiny`: the GPU bench's CPU smoke run, so it cannot rot between GPU sessions. Every part runs
the product's own code (model dirs, Teacher/TeacherPool, StageObjective, run_task_stage) and none may fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

ROOT = Path(__file__).parent.parent


def test_gpu_bench_tiny_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--steps", "1", "--warmup", "0",
                           "--kd-loss", "jsd", "--json", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    record = json.loads(out.read_text())
    errors = {name: part.get("error") for name, part in record["parts"].items() if "error" in part or "skipped" in part}
    assert proc.returncode == 0 and not errors, (errors, proc.stdout[-3000:], proc.stderr[-3000:])
    parts = record["parts"]
    assert set(parts) == {"teacher", "student", "lora", "actor", "e2e"}
    assert parts["teacher"]["impl"] == "workers.teachers.pool.Teacher.infer"
    assert "kd_loss=jsd" in parts["student"]["impl"]
    assert parts["e2e"]["teacher_calls"] >= parts["e2e"]["steps"] >= 1
    assert all(part["samples_per_s"] > 0 for part in parts.values())
