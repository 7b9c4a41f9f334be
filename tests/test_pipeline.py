"""`hkd run` end to end on Ray Train with 2 workers (DDP over gloo), recorded in MLflow.

One-worker runs of the same path are end-to-end tested in test_distill_pipeline, test_sweep and
test_job_submit; this file adds what only several workers exercise."""

from __future__ import annotations

import json

import mlflow
import pytest
import ray

from orchestrator.cli import main
from workers.calibration import load_shift

TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"


def _config(tmp_path) -> str:
    """One level (what several workers exercise is the same for every level), grounding-pretrained first, so
    DDP runs in that loop too. Validation every step: rank 0 scores mid-epoch while the other worker waits at
    its all-reduce."""
    path = tmp_path / "tiny2.yaml"
    path.write_text(f"""
name: tiny2
vocab_size: 512
data: {{source: synth, synth: {{train: 8, val: 4, test: 4}}}}
levels: {{L: {TINY}}}
pretrain: {{enabled: true, steps: 2, batch_size: 2, log_every: 1}}
direct: {{levels: [L], train: {{epochs: 2, batch_size: 4, log_every: 1, eval_every: 1}}}}
resources: {{num_workers: 2, cpus_per_worker: 1}}
""")
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_ray():
    yield
    ray.shutdown()


def test_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r"
    assert main(["run", _config(tmp_path), "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["rows"]) == ["L-direct", "L-direct+shift"]
    for row in report["rows"].values():
        for task in ("hallucination", "factuality"):
            assert 0 <= row[task]["f1"] <= 1 and row[task]["auroc"] is not None
    assert (run_dir / "models" / "L" / "model.safetensors").is_file()
    assert set(load_shift(run_dir / "models" / "L")) == {"hallucination", "factuality"}
    stage = json.loads((run_dir / "stages" / "L-direct.json").read_text())
    assert stage["val"]["world_size"] == 2 and stage["val"]["steps"] >= 2
    assert "| L-direct |" in capsys.readouterr().out
    _assert_type_breakdown(report, run_dir)
    ground = json.loads((run_dir / "stages" / "L-grounding.json").read_text())
    assert ground["val"]["steps"] == 2 and 0 <= ground["val"]["grounding_accuracy"] <= 1
    assert (run_dir / "models" / "L-grounding" / "model.safetensors").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hkd4vlm"], output_format="list")
    parent = [r for r in runs if r.info.run_name == "tiny2"]
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert len(parent) == 1 and set(stages) == {"L-grounding", "L-direct"}
    assert parent[0].info.status == "FINISHED" and "L-direct/f1" in parent[0].data.metrics
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(stages["L-direct"].info.run_id, "loss")) >= 2
    assert "test/hallucination/f1" in stages["L-direct"].data.metrics
    # The learning curve: validation macro-F1 at every step (2 steps per epoch, 2 epochs), each scored once.
    for task in ("hallucination", "factuality"):
        curve = client.get_metric_history(stages["L-direct"].info.run_id, f"val/{task}/f1")
        assert sorted(m.step for m in curve) == [1, 2, 3, 4] and all(0 <= m.value <= 1 for m in curve)

    # Running again skips finished stages and leaves their models untouched.
    mtime = (run_dir / "models" / "L" / "model.safetensors").stat().st_mtime
    assert main(["run", _config(tmp_path), "--run-dir", str(run_dir)]) == 0
    assert "[L-direct] already finished: skipped" in capsys.readouterr().out
    assert (run_dir / "models" / "L" / "model.safetensors").stat().st_mtime == mtime

    # The same run dir under a changed config is refused before any work: its results would not match.
    assert main(["run", _config(tmp_path), "--run-dir", str(run_dir), "--set", "seed=7"]) == 2
    assert "L-grounding.json: this stage was finished with a different config" in capsys.readouterr().err
    assert (run_dir / "models" / "L" / "model.safetensors").stat().st_mtime == mtime


def _assert_type_breakdown(report: dict, run_dir) -> None:
    """Every row breaks its test decisions down by the generator's types, covering every labelled one."""
    test = {t: [json.loads(line) for line in (run_dir / "data" / t / "test.jsonl").read_text().splitlines()]
            for t in ("hallucination", "factuality")}
    hallucinated = sum(sum(r["hallucinated"]) for r in test["hallucination"])
    for name, row in report["rows"].items():
        options, claims = row["types"]["hallucination"], row["types"]["factuality"]
        assert sum(s["n"] for s in options.values()) == hallucinated, name
        assert all(0 <= s["recall"] <= 1 for s in options.values())
        assert sum(s["n"] for s in claims["type"].values()) == sum(s["n"] for s in claims["hard"].values()) == 4
    assert "## Per type (test)" in (run_dir / "report.md").read_text()
