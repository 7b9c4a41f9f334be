"""Issue 15: hkd's console shows its own lines only (Ray's and the libraries' output goes to `<run dir>/logs/`),
a failure shows its root cause and the log's path, the Ray dashboard answers during a run (and is off on
request), and report.md reads on its own (rendered to HTML, every image it links exists).

One shrunk pipeline run in a subprocess, as a user runs it (`hkd run … 2>&1 | cat`), serves most tests; a
re-run of the same run dir (every stage finished: skipped) checks `-v` and `resources.dashboard: false`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"
# Lines that only Ray's internals, Ray Data or weight loading print; none may reach the default console.
NOISE = re.compile(r"\(pid=|\(\w+ pid=|PlacementGroupCleaner|State API|Loading weights|Running Dataset|"
                   r"Started a local Ray|INFO worker\.py|WARNING|Traceback|ray\.|it/s\]|row/s")


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "console.yaml"
    path.write_text(f"""
name: console
vocab_size: 512
data: {{source: synth, synth: {{train: 8, val: 4, test: 4}}}}
levels: {{L: {TINY}, S: {TINY}}}
direct: {{levels: [L, S], train: {{epochs: 1, batch_size: 4, log_every: 1}}}}
ppod: {{enabled: true, stages: [{{student: S, teachers: [{{level: L, weight: 1.0}}]}}],
        train: {{epochs: 1, batch_size: 4, log_every: 1}}}}
tcrd: {{enabled: false}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
""")
    return path


def _hkd(args: list[str], cwd: Path, on_line=None, timeout: float = 900) -> tuple[int, list[str]]:
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


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One shrunk run (3 stages) with the dashboard on; the dashboard URL is fetched while the run goes on."""
    tmp = tmp_path_factory.mktemp("console")
    run_dir = tmp / "runs" / "console"
    seen: dict = {}

    def watch(line: str) -> None:
        m = re.search(r"Ray dashboard: (http://\S+)", line)
        if m and "url" not in seen:
            seen["url"] = m.group(1)
            seen["status"] = _status(seen["url"])  # the run is still going: its stages come after this line

    rc, lines = _hkd(["run", str(_config(tmp)), "--run-dir", str(run_dir)], tmp, watch)
    return {"rc": rc, "lines": lines, "run_dir": run_dir, "tmp": tmp, **seen}


def test_default_console_is_hkds_own_lines(finished):
    lines = finished["lines"]
    assert finished["rc"] == 0, "\n".join(lines[-30:])
    assert len(lines) <= 100, "\n".join(lines)
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, noisy
    text = "\n".join(lines)
    for expected in ("hkd run console: 3 stages", "level L:", "data: train", "run dir:", "stage 1/3: L-direct",
                     "[S+PPOD] done in", "| S+PPOD+shift |", "report:", "plots:", "mlflow ui --backend-store-uri"):
        assert expected in text, expected
    log = finished["run_dir"] / "logs" / "hkd.log"
    assert log.is_file() and len(log.read_text().splitlines()) > len(lines)  # the rest went there


def test_dashboard_answers_during_the_run_and_no_state_api_warning(finished):
    assert finished.get("url"), "no dashboard URL printed"
    assert finished["status"] == 200
    logs = finished["run_dir"] / "logs"
    texts = [logs / "hkd.log"] + [p for p in (logs / "ray").glob("*") if p.suffix in (".err", ".out", ".log")]
    hits = [str(p) for p in texts if p.is_file() and "State API" in p.read_text(errors="replace")]
    assert not hits, hits


def test_report_reads_on_its_own_and_its_images_exist(finished):
    import markdown

    run_dir = finished["run_dir"]
    text = (run_dir / "report.md").read_text()
    for expected in ("## What ran", "seed: 0", "wall time:", "machine:", "*chance*", "**", "## The claim, checked",
                     "**hallucination**", "**factuality**", "S-direct", "models/S", "mlflow ui --backend-store-uri"):
        assert expected in text, expected
    html = markdown.markdown(text, extensions=["tables", "fenced_code"])
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) >= 3
    for src in images:
        assert (run_dir / src).is_file(), src
    assert "<table>" in html

    # `hkd report` on a copy of the run dir (with its store beside it) prints the same page, paths of the copy.
    copy = finished["tmp"] / "elsewhere" / "console"
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.copy(run_dir.parent / "mlflow.db", copy.parent / "mlflow.db")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", str(copy)], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert "## The claim, checked" in out and f"sqlite:///{copy.parent.resolve()}/mlflow.db" in out


def test_verbose_rerun_without_dashboard(finished):
    """Every stage is finished: the re-run only starts Ray, encodes the data and writes the report. `-v` shows
    Ray's and the libraries' output too; `resources.dashboard=false` starts no dashboard."""
    run_dir = finished["run_dir"]
    rc, lines = _hkd(["run", "-v", str(_config(finished["tmp"])), "--run-dir", str(run_dir),
                      "--set", "resources.dashboard=false"], finished["tmp"])
    text = "\n".join(lines)
    assert rc == 0, text[-3000:]
    assert "already finished: skipped" in text and "Ray dashboard:" not in text
    assert [line for line in lines if NOISE.search(line)], "-v shows Ray's own output"
    # Ray keeps a minimal dashboard process (and its dashboard.log) even without the dashboard; what tells is that
    # Ray announces no dashboard URL for this attempt.
    attempt = (run_dir / "logs" / "hkd.log").read_text().rsplit("==== hkd run", 1)[1]
    assert "Started a local Ray instance" in attempt and "View the dashboard at" not in attempt


def test_broken_stage_shows_root_cause_and_log_path(finished):
    """A stage whose model weights are corrupt fails inside the Ray Train worker: the console names the cause
    and the log, without Ray's tracebacks."""
    tmp = finished["tmp"]
    run_dir = tmp / "runs" / "broken"
    shutil.copytree(finished["run_dir"] / "models" / "init", run_dir / "models" / "init")
    (run_dir / "models" / "init" / "L" / "model.safetensors").write_bytes(b"not a safetensors file")
    rc, lines = _hkd(["run", str(_config(tmp)), "--run-dir", str(run_dir)], tmp)
    text = "\n".join(lines)
    assert rc == 1, text[-3000:]
    assert len(lines) <= 40 and "Traceback" not in text, text
    error = [line for line in lines if line.startswith("hkd: error:")]
    assert error and "L-direct" in error[0] and re.search(r"safetensor|header|deserializ", error[0], re.I), text
    assert f"{run_dir.resolve() / 'logs' / 'hkd.log'}" in text or f"{run_dir / 'logs' / 'hkd.log'}" in text
    assert "Traceback" in (run_dir / "logs" / "hkd.log").read_text()


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    """Off a terminal, the stage's progress is a line at most every `line_every_s` (30 s by default), with step,
    loss, validation F1, steps/s and ETA from the file rank 0 writes."""
    import json

    from orchestrator.progress import step_bar

    progress = tmp_path / "s.progress"
    with step_bar("S-direct", progress, poll_s=0.02, line_every_s=0.2):
        for step in range(1, 9):
            progress.write_text(json.dumps({"step": step, "total": 8, "loss": 1.0 / step,
                                            "val/hallucination/f1": 0.6, "val/factuality/f1": 0.7}))
            time.sleep(0.1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[S-direct] step")]
    assert 1 <= len(lines) <= 5, lines
    assert re.search(r"step \d/8 · loss \d\.\d{3} · val f1 0\.650 · [\d.]+ steps/s · ETA \dm\d\ds", lines[-1]), lines
