"""Every bench script runs, on CPU, at the smallest size it takes, so none can break unseen again between the
sessions that read its figures (the figures themselves mean nothing at this size).

Which test runs which script: `gpu.py` (`--tiny`, its CPU path): tests/test_gpu_bench.py; `claim.py --from-run`:
tests/test_distill_pipeline.py::test_claim_bench_scores_a_finished_run (on the method run it shares);
`tiny_pair.py` (the pair the CPU benches share): through overhead.py and overlap.py; every other script here.
Every script's `main` runs in this process, with its command-line arguments, except startup.py, whose subject is
fresh interpreters (a subprocess, as a user runs it). Those that start a Ray of their own share one here (their
`ray.init` and `ray.shutdown` do nothing): starting Ray and an interpreter for each is most of what these tiny
runs would cost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TINY = ("{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, "
        "vision_heads: 2}")
# The smallest run a TCRD sweep reads: three tiny levels directly tuned, TCRD of S from L and M.
SWEEP_BASE = f"""
name: tiny
vocab_size: 1024
data: {{source: synth, synth: {{train: 4, val: 2, test: 2}}}}
levels: {{L: {TINY}, M: {TINY}, S: {TINY}}}
direct: {{levels: [L, M, S], train: {{epochs: 1, batch_size: 4}}}}
ppod: {{enabled: false}}
tcrd: {{enabled: true, train: {{epochs: 1, batch_size: 4}}}}
teachers: {{k: 8, num_cpus: 0.5}}
resources: {{num_workers: 1, cpus_per_worker: 1, dashboard: false}}
"""


def bench_module(name: str):
    """bench/<name>.py imported as its own module (bench/ is a folder of scripts, not a package)."""
    for path in (str(ROOT), str(BENCH)):  # record_format imports bench.tiny_pair, overhead imports tiny_pair
        if path not in sys.path:
            sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: float = 600) -> list[str]:
    """`python bench/<name>.py ARGS` as a user runs it; its stdout lines (it must exit 0)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout.splitlines()


def last_json(lines: list[str]) -> dict:
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


@pytest.fixture(autouse=True)
def _torch_threads():
    """The in-process benches set torch's threads; the next test gets them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("levels", ["tiny", "bases"])
def test_learnability(levels, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    base = ["--base-dir", str(ROOT / "bases" / "tiny-qwen2_5_vl-84px")] if levels == "bases" else []
    summary = bench_module("learnability").main(
        [*base, "--levels", "S", "--steps", "2", "--batch", "4", "--train", "2", "--val", "1", "--eval-every", "1",
         "--threads", "1"])
    s = summary["levels"]["S"]
    assert s["steps"] == 2 and [p["step"] for p in s["curve"]] == [1, 2]
    assert all(p["loss"] > 0 and 0 <= p["f1"] <= 1 for p in s["curve"]) and s["by_type"]


def test_payload(capsys):
    assert bench_module("payload").main(["--units", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["k"] for r in res["rows"]] == [4, 16, 64] and res["full_bytes_per_token"] > 0


def test_record_format(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["record_format.py", "--records", "2", "--batch", "2", "--threads", "1",
                                      "--json", "--device", "cpu"])
    bench_module("record_format").main()
    res = last_json(capsys.readouterr().out.splitlines())
    assert res["new_decisions_per_s"] > 0 and res["old_decisions_per_s"] > 0


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray (`hkd run`'s own, sized for a TCRD sweep trial: its driver, one worker, two teachers) for the
    benches that start their own: they run one after another in it, not each in a Ray and an interpreter of its
    own (the seconds of starting both, several times over, are most of what these tiny runs cost)."""
    import ray

    from orchestrator.config.schema import Resources
    from orchestrator.cluster.placement import init_ray

    saved = dict(os.environ)
    init_ray(Resources(num_workers=1, cpus_per_worker=1, dashboard=False), teacher_cpus=2)
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def in_shared_ray(shared_ray, monkeypatch):
    """The bench's own `ray.init` and `ray.shutdown` do nothing (Ray is up); the environment it changes (stage_tail:
    Ray Train's poll interval) is the same again after it."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_main(name: str, args: list[str], monkeypatch, capsys) -> list[str]:
    """bench/<name>.py's `main()` with `args` as its command line; its stdout lines."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    bench_module(name).main()
    return capsys.readouterr().out.splitlines()


def test_overlap(in_shared_ray, monkeypatch, capsys):
    rows = last_json(run_main("overlap", ["--steps", "2", "--batch", "2"], monkeypatch, capsys))
    assert {"teacher_s", "student_s", "prefetch_0", "prefetch_1", "prefetch_2"} <= set(rows)


def test_overhead(in_shared_ray, monkeypatch, capsys):
    res = last_json(run_main("overhead", ["--steps", "3", "--batch", "2"], monkeypatch, capsys))
    assert res["in_process"] > 0 and res["ray"] > 0


def test_stage_tail(in_shared_ray, monkeypatch, capsys):
    lines = run_main("stage_tail", ["--fits", "1"], monkeypatch, capsys)
    assert any(line.startswith("mean tail, hkd / Ray default") for line in lines), lines[-10:]


def test_sweep_cache(in_shared_ray, tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.yaml").write_text(SWEEP_BASE)
    monkeypatch.chdir(tmp_path)
    res = last_json(run_main("sweep_cache", ["--base", str(tmp_path / "tiny.yaml"), "--trials", "1"], monkeypatch,
                             capsys))
    assert res["off"]["teacher_units"] > 0 and res["on"]["per_trial_units"] == res["off"]["per_trial_units"]


def test_soak(in_shared_ray, tmp_path, monkeypatch, capsys):
    res = last_json(run_main("soak", ["--epochs", "1", "--minutes", "0", "--direct-only", "--out", str(tmp_path)],
                             monkeypatch, capsys))
    assert set(res["clean"]) == set(res["faulty"]) == {"L-direct"} and not res["events"]


def test_startup():
    lines = run_script("startup", "--stages", "1", "--records", "1")
    assert any(line.startswith("this checkout: fixed cost of a stage") for line in lines), lines[-20:]
