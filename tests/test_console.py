"""Issue 15: hkd's console shows its own lines only (Ray's and the libraries' output goes to `<run dir>/logs/`),
a failure shows its root cause and the log's path, the Ray dashboard answers during a run (and is off on
request), and report.md reads on its own (rendered to HTML, every image it links exists).

The session's shared run of the whole method with its ablation (`conftest.method_run`: a subprocess, as a user
runs it, `hkd run … 2>&1 | cat`) serves most tests; a re-run of the same run dir (every stage finished: skipped)
checks `-v` and `resources.dashboard: false`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, hkd_cli

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

# Lines that only Ray's internals, Ray Data or weight loading print; none may reach the default console.
NOISE = re.compile(r"\(pid=|\(\w+ pid=|PlacementGroupCleaner|State API|Loading weights|Running Dataset|"
                   r"Started a local Ray|INFO worker\.py|WARNING|Traceback|ray\.|it/s\]|row/s")


def test_default_console_is_hkds_own_lines(method_run):
    lines = method_run["lines"]
    assert method_run["rc"] == 0, "\n".join(lines[-30:])
    main_run = lines[:next(i for i, line in enumerate(lines) if line.startswith("[ablation]"))]
    assert len(main_run) <= 100, "\n".join(main_run)  # six stages; each ablation variant adds its own lines
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, noisy
    last = [line for line in lines if line.strip()][-1]
    assert last.startswith("| "), lines[-5:]  # the ablation table ends it: nothing of Ray's after hkd's last line
    text = "\n".join(lines)
    for expected in ("hkd run method: 6 stages", "level L:", "data: train", "run dir:", "stage 1/6: L-direct",
                     "[S+PPOD] done in", "| S+PPOD+TCRD+shift |", "[ablation] no PPOD:", "report:", "plots:",
                     "mlflow ui --backend-store-uri"):
        assert expected in text, expected
    log = method_run["run_dir"] / "logs" / "hkd.log"
    assert log.is_file() and len(log.read_text().splitlines()) > len(lines)  # the rest went there


def test_dashboard_answers_during_the_run_and_no_state_api_warning(method_run):
    assert method_run.get("url"), "no dashboard URL printed"
    assert method_run["status"] == 200
    logs = method_run["run_dir"] / "logs"
    # Ray's session logs: a copy made when the run ended, and the session named (no link into /tmp/ray: issue 34)
    assert (logs / "ray" / "raylet.out").is_file() and not (logs / "ray").is_symlink()
    assert "copied into" in (logs / "ray-session.txt").read_text()
    texts = [logs / "hkd.log"] + [p for p in (logs / "ray").glob("*") if p.suffix in (".err", ".out", ".log")]
    hits = [str(p) for p in texts if p.is_file() and "State API" in p.read_text(errors="replace")]
    assert not hits, hits


def test_report_reads_on_its_own_and_its_images_exist(method_run):
    import markdown

    run_dir = method_run["run_dir"]
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
    copy = method_run["tmp"] / "elsewhere" / "console"
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.copy(run_dir.parent / "mlflow.db", copy.parent / "mlflow.db")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", str(copy)], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert "## The claim, checked" in out and f"sqlite:///{copy.parent.resolve()}/mlflow.db" in out


def test_verbose_rerun_without_dashboard(method_run):
    """Every stage is finished: the re-run only starts Ray, encodes the data and writes the report. `-v` shows
    Ray's and the libraries' output too; `resources.dashboard=false` starts no dashboard. It re-runs a copy
    (without the ablation's variants): the shared run dir keeps the report of `--ablation`."""
    run_dir = method_run["tmp"] / "rerun" / "method"
    shutil.copytree(method_run["run_dir"], run_dir, symlinks=True, ignore=shutil.ignore_patterns("ablation"))
    rc, lines = hkd_cli(["run", "-v", str(method_run["config"]), "--run-dir", str(run_dir),
                       "--set", "resources.dashboard=false"], method_run["tmp"])
    text = "\n".join(lines)
    assert rc == 0, text[-3000:]
    assert "already finished: skipped" in text and "Ray dashboard:" not in text
    assert [line for line in lines if NOISE.search(line)], "-v shows Ray's own output"
    # Ray keeps a minimal dashboard process (and its dashboard.log) even without the dashboard; what tells is that
    # Ray announces no dashboard URL for this attempt.
    attempt = (run_dir / "logs" / "hkd.log").read_text().rsplit("==== hkd run", 1)[1]
    assert "Started a local Ray instance" in attempt and "View the dashboard at" not in attempt


def test_broken_stage_shows_root_cause_and_log_path(method_run):
    """A stage whose model weights are corrupt fails inside the Ray Train worker: the console names the cause
    and the log, without Ray's tracebacks. No retry (`resources.max_failures=0`): each would fail the same way."""
    tmp = method_run["tmp"]
    run_dir = tmp / "broken" / "broken"  # its own MLflow store: the shared run's has one parent run "method"
    shutil.copytree(method_run["run_dir"] / "models" / "init", run_dir / "models" / "init")
    (run_dir / "models" / "init" / "L" / "model.safetensors").write_bytes(b"not a safetensors file")
    rc, lines = hkd_cli(["run", str(method_run["config"]), "--run-dir", str(run_dir),
                         "--set", "resources.max_failures=0"], tmp)
    text = "\n".join(lines)
    assert rc == 1, text[-3000:]
    assert len(lines) <= 40 and "Traceback" not in text, text
    error = [line for line in lines if line.startswith("hkd: error:")]
    assert error and "L-direct" in error[0] and re.search(r"safetensor|header|deserializ", error[0], re.I), text
    assert f"{run_dir.resolve() / 'logs' / 'hkd.log'}" in text or f"{run_dir / 'logs' / 'hkd.log'}" in text
    log = (run_dir / "logs" / "hkd.log").read_text()
    assert "Traceback" in log
    assert "failed after 0 retries" in error[0] and "[FailurePolicy] RETRY" not in log  # Ray Train got the 0


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    """Off a terminal, the stage's progress is a line at most every `line_every_s` (30 s by default), with step,
    loss, validation F1, steps/s and ETA from the file rank 0 writes."""
    import json

    from orchestrator.report.progress import step_bar

    progress = tmp_path / "s.progress"
    with step_bar("S-direct", progress, poll_s=0.02, line_every_s=0.2):
        for step in range(1, 9):
            progress.write_text(json.dumps({"step": step, "total": 8, "loss": 1.0 / step,
                                            "val/hallucination/f1": 0.6, "val/factuality/f1": 0.7}))
            time.sleep(0.1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[S-direct] step")]
    assert 1 <= len(lines) <= 5, lines
    assert re.search(r"step \d/8 · loss \d\.\d{3} · val f1 0\.650 · [\d.]+ steps/s · ETA \dm\d\ds", lines[-1]), lines
