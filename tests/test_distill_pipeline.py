"""The whole method on minimal settings (`conftest.METHOD_CONFIG`): direct → PPOD (M from L, S from M+L) → TCRD,
teachers in Ray actors, the distillation stages also learning from generated unlabelled inputs."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from tests.conftest import METHOD_CONFIG
from orchestrator.config.schema import load_config
from orchestrator.run.teachers import _pool_name
from orchestrator.run.kinds import plan_stages

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)


@pytest.fixture()
def config_path(tmp_path):
    path = tmp_path / "method.yaml"
    path.write_text(METHOD_CONFIG)
    return path


def test_plan_follows_the_pyramid_and_ablation_switches(config_path):
    plans = {p.name: p for p in plan_stages(load_config(config_path))}
    assert list(plans) == ["L-direct", "M-direct", "S-direct", "M+PPOD", "S+PPOD", "S+PPOD+TCRD"]
    assert [t.stage for t in plans["M+PPOD"].teachers] == ["L-direct"]
    assert [t.stage for t in plans["S+PPOD"].teachers] == ["M+PPOD", "L-direct"]
    tcrd = plans["S+PPOD+TCRD"]
    assert tcrd.init == "S+PPOD" and [t.stage for t in tcrd.teachers] == ["L-direct", "M+PPOD"]
    assert all(t.coupled for t in tcrd.teachers) and not any(t.coupled for t in plans["S+PPOD"].teachers)

    no_ppod = {p.name: p for p in plan_stages(load_config(config_path, ["ppod.enabled=false"]))}
    assert list(no_ppod) == ["L-direct", "M-direct", "S-direct", "S+TCRD"]
    assert no_ppod["S+TCRD"].init == "S-direct"
    assert [t.stage for t in no_ppod["S+TCRD"].teachers] == ["L-direct", "M-direct"]
    no_tcrd = plan_stages(load_config(config_path, ["tcrd.enabled=false"]))
    assert [p.name for p in no_tcrd][-1] == "S+PPOD"


def test_full_method_runs_with_teacher_actors_and_ablation(method_run):
    """`hkd run method.yaml --ablation` (the session's shared run, `conftest.method_run`)."""
    run_dir = method_run["run_dir"]
    assert method_run["rc"] == 0, "\n".join(method_run["lines"][-30:])
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["rows"]) == ["L-direct", "M-direct", "S-direct", "M+PPOD", "S+PPOD", "S+PPOD+TCRD",
                                    "S+PPOD+TCRD+shift"]
    for stage in ("M+PPOD", "S+PPOD", "S+PPOD+TCRD"):
        assert (run_dir / "models" / stage / "model.safetensors").is_file()
    for plot in ("training_curves", "reliability", "confusion", "ablation", "ablation_parts"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 5000, plot

    # Ablation rows come from real runs: "no PPOD" trained its own S+TCRD (from S-direct) and shared the
    # direct stages; "no TCRD" shared everything (its final model is the full run's S+PPOD).
    ablation = report["ablation"]
    assert list(ablation) == ["full method", "no shift", "no PPOD", "no TCRD", "hard pseudo-labels",
                              "gold labels on all inputs"]
    assert ablation["full method"] == report["rows"]["S+PPOD+TCRD+shift"]
    assert ablation["no shift"] == report["rows"]["S+PPOD+TCRD"]
    no_tcrd = run_dir / "ablation" / "no-TCRD"
    assert all((no_tcrd / "models" / m).is_symlink() for m in ("L", "M", "S", "M+PPOD", "S+PPOD"))
    assert json.loads((no_tcrd / "report.json").read_text())["rows"]["S+PPOD+shift"] == ablation["no TCRD"]
    no_ppod = run_dir / "ablation" / "no-PPOD"
    assert (no_ppod / "models" / "S+TCRD").is_dir() and not (no_ppod / "models" / "S+TCRD").is_symlink()
    assert all((no_ppod / "models" / lv).is_symlink() for lv in ("L", "M", "S"))
    assert json.loads((no_ppod / "report.json").read_text())["rows"]["S+TCRD+shift"] == ablation["no PPOD"]
    assert "## Ablation" in (run_dir / "report.md").read_text()

    mlflow.set_tracking_uri(f"sqlite:///{run_dir.parent}/mlflow.db")
    client = mlflow.MlflowClient()
    runs = _stage_runs("method")
    _assert_unlabelled_inputs(run_dir, runs, _stage_runs("method-hard-pseudo-labels"),
                              _stage_runs("method-gold-labels-on-all-inputs"))
    # The full run's L-direct teacher kept running for the next variant, "no PPOD", whose S+TCRD learnt from it and
    # started only the teacher no earlier stage had served (M-direct).
    assert any(line.startswith("[ablation] no PPOD:") and line.endswith("; teachers still running: L-direct")
               for line in method_run["lines"]), method_run["lines"]
    teachers = _stage_runs("method-no-PPOD")["S+TCRD"].data.params["loss.teachers"]
    assert f"'pool': '{_pool_name(run_dir.resolve(), 'L-direct')}'" in teachers
    assert f"'pool': '{_pool_name(no_ppod.resolve(), 'M-direct')}'" in teachers
    tcrd = runs["S+PPOD+TCRD"].info.run_id
    for key in ("loss_kd_" , "coupling_"):
        assert any(k.startswith(key) for k in runs["S+PPOD+TCRD"].data.metrics), key
    waits = client.get_metric_history(tcrd, "teacher_wait_s")
    steps = client.get_metric_history(tcrd, "student_step_s")
    assert len(waits) >= 2 and len(steps) == len(waits)
    assert all(m.value >= 0 for m in waits)


def _stage_runs(parent: str) -> dict:
    """The stage runs of one (variant) run by stage name: every variant names its stages alike."""
    every = mlflow.search_runs(experiment_names=["hkd4vlm"], output_format="list")
    (parent_id,) = [r.info.run_id for r in every if r.info.run_name == parent]
    return {r.info.run_name: r for r in every if r.data.tags.get("mlflow.parentRunId") == parent_id}


def _assert_unlabelled_inputs(run_dir, runs: dict, pseudo: dict, gold: dict) -> None:
    """Distillation stages count the unlabelled inputs and log a finite KD term over them; direct stages never
    see them; the pseudo-label row logs its (CE) term, the gold-label row has no unlabelled positions."""
    counts = json.loads((run_dir / "run.json").read_text())["unlabeled"]
    assert counts["records"] + counts["dropped_overlap"] == 4 and counts["records"] > 0
    for name in ("M+PPOD", "S+PPOD", "S+PPOD+TCRD"):
        metrics = runs[name].data.metrics
        assert metrics["unlabeled_records"] == counts["records"], name
        assert np.isfinite(metrics["loss_unlabeled"]) and metrics["loss_unlabeled"] > 0, name
        assert float(runs[name].data.params["loss.unlabeled_weight"]) == 1.0
    for name in ("L-direct", "M-direct", "S-direct"):
        assert runs[name].data.metrics["unlabeled_records"] == 0 and "loss_unlabeled" not in runs[name].data.metrics
    assert np.isfinite(pseudo["S+PPOD+TCRD"].data.metrics["loss_unlabeled"])
    assert "loss_unlabeled" not in gold["S+PPOD+TCRD"].data.metrics
    assert gold["S+PPOD+TCRD"].data.metrics["unlabeled_records"] == counts["records"]


def test_claim_bench_scores_a_finished_run(method_run):
    """bench/claim.py reads a finished run's own stage results (no extra seed here: each costs its S stages) and
    prints the paired gain of the final S over S-direct, both unshifted and each with its own shift."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, str(root / "bench" / "claim.py"), "--from-run", str(method_run["run_dir"]),
                           "--seeds", ""], capture_output=True, text=True, timeout=300, cwd=method_run["tmp"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("paired bootstrap 95%") == 2 and "## each with its own shift" in proc.stdout
    claim = json.loads((method_run["run_dir"] / "claim" / "claim.json").read_text())
    assert set(claim) == {"no shift", "each with its own shift"}
    gain = claim["no shift"]["gain_over_direct"]
    assert gain["interval"][0] <= gain["mean"] <= gain["interval"][1]
