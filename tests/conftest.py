"""Shared fixtures: a tiny benchmark and a tiny two-level pyramid, built once per test session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from workers.data import synth  # noqa: E402
from workers.data.records import load_jsonl  # noqa: E402
from workers.models.model_dirs import LevelShape, build_level, build_tokenizer  # noqa: E402
from workers.models.prompts import record_units  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = LevelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_depth=1,
                  vision_heads=2)


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    synth.generate(out, seed=1, n_train=12, n_val=6, n_test=6)
    return out


@pytest.fixture(scope="session")
def records(bench_dir) -> list[dict]:
    return [r for t in synth.TASKS for r in load_jsonl(bench_dir / t / "train.jsonl")]


@pytest.fixture(scope="session")
def tokenizer(records):
    return build_tokenizer([u["text"] + u["answer"] for u in record_units(records)] + synth.sample_texts(50), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_level(tmp_path_factory.mktemp("models") / "tiny", TINY, tokenizer, image_size=112)


@pytest.fixture(autouse=True)
def _own_tracking_store(monkeypatch):
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which `hkd run` honours: no test may inherit
    another test's tracking store. Cleared after each test too: a module-scoped fixture's run (test_faults'
    reference) starts before the next test's own clearing."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)



def stage_loss_config(teachers: list[dict] = (), **over):
    """`orchestrator.run.stages.default_stage_loss` (the run config's defaults), for tests that drive the workers."""
    from orchestrator.run.stages import default_stage_loss

    return default_stage_loss(teachers, **over)


TINY_YAML = ("{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, "
             "vision_heads: 2}")
# The whole method on minimal settings: direct → PPOD (M from L, S from M+L) → TCRD, teachers in Ray actors, the
# distillation stages also learning from generated unlabelled inputs.
METHOD_CONFIG = f"""
name: method
vocab_size: 1024
data: {{source: synth, synth: {{train: 6, val: 4, test: 4, unlabeled: 2}}}}
levels: {{L: {TINY_YAML}, M: {TINY_YAML}, S: {TINY_YAML}}}
direct: {{levels: [L, M, S], train: {{epochs: 1, batch_size: 4, log_every: 1}}}}
ppod:
  enabled: true
  stages:
    - {{student: M, teachers: [{{level: L}}]}}
    - {{student: S, teachers: [{{level: M, weight: 0.7}}, {{level: L, weight: 0.3}}]}}
  train: {{epochs: 1, batch_size: 4, log_every: 1}}
tcrd: {{enabled: true, train: {{epochs: 1, batch_size: 4, log_every: 1}}}}
teachers: {{k: 8, num_cpus: 0.5}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
"""


def copy_checkout(dest: Path) -> Path:
    """This checkout without .git and what .gitignore names (venv, run dirs, MLflow stores, caches), copied to
    `dest`: what a fresh clone holds, plus any file not yet committed."""
    ignored = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", *ignored))
    return dest


def hkd_cli(args: list[str], cwd: Path, on_line=None, timeout: float = 900) -> tuple[int, list[str]]:
    """`hkd ARGS 2>&1 | cat`: stdout and stderr into one pipe; `on_line` sees each line as it comes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if on_line:
            on_line(lines[-1])
        if time.monotonic() > deadline:
            proc.kill()
    return proc.wait(), lines


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="session")
def method_run(tmp_path_factory) -> dict:
    """One `hkd run method.yaml --ablation` as a user runs it (a subprocess, the dashboard on), shared by the
    method's tests (test_distill_pipeline) and the console's (test_console): its exit code, console lines, run
    dir, config path, and the dashboard's URL and HTTP status fetched while the run went on."""
    tmp = tmp_path_factory.mktemp("method")
    config = tmp / "method.yaml"
    config.write_text(METHOD_CONFIG)
    run_dir = tmp / "runs" / "method"
    seen: dict = {}

    def watch(line: str) -> None:
        m = re.search(r"Ray dashboard: (http://\S+)", line)
        if m and "url" not in seen:
            seen["url"] = m.group(1)
            seen["status"] = http_status(seen["url"])  # the run is still going: its stages come after this line

    rc, lines = hkd_cli(["run", str(config), "--run-dir", str(run_dir), "--ablation"], tmp, watch, timeout=2400)
    return {"rc": rc, "lines": lines, "run_dir": run_dir, "config": config, "tmp": tmp, **seen}
