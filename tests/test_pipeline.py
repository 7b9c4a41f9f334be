"""`hkd run` end to end on Ray Train (1 worker, and 2 workers with DDP over gloo), recorded in MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest
import ray

from orchestrator.cli import main
from workers.calibration import load_shift

TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"


def _config(tmp_path, workers: int) -> str:
    """With 2 workers the levels are grounding-pretrained first (DDP in that loop too)."""
    path = tmp_path / f"tiny{workers}.yaml"
    path.write_text(f"""
name: tiny{workers}
vocab_size: 512
data: {{source: synth, synth: {{train: 8, val: 4, test: 4}}}}
levels: {{L: {TINY}, S: {TINY}}}
pretrain: {{enabled: {str(workers == 2).lower()}, steps: 2, batch_size: 2, log_every: 1}}
direct: {{levels: [L, S], train: {{epochs: 2, batch_size: 4, log_every: 1}}}}
resources: {{num_workers: {workers}, cpus_per_worker: 1}}
""")
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_ray():
    yield
    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_run_end_to_end(tmp_path, workers, capsys):
    run_dir = tmp_path / "runs" / "r"
    assert main(["run", _config(tmp_path, workers), "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["rows"]) == ["L-direct", "S-direct", "S-direct+shift"]
    for row in report["rows"].values():
        for task in ("hallucination", "factuality"):
            assert 0 <= row[task]["f1"] <= 1 and row[task]["auroc"] is not None
    for level in ("L", "S"):
        assert (run_dir / "models" / level / "model.safetensors").is_file()
        assert set(load_shift(run_dir / "models" / level)) == {"hallucination", "factuality"}
        stage = json.loads((run_dir / "stages" / f"{level}-direct.json").read_text())
        assert stage["val"]["world_size"] == workers and stage["val"]["steps"] >= 2
    assert "| L-direct |" in capsys.readouterr().out
    if workers == 2:
        for level in ("L", "S"):
            ground = json.loads((run_dir / "stages" / f"{level}-grounding.json").read_text())
            assert ground["val"]["steps"] == 2 and 0 <= ground["val"]["grounding_accuracy"] <= 1
            assert (run_dir / "models" / f"{level}-grounding" / "model.safetensors").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hkd4vlm"], output_format="list")
    parent = [r for r in runs if r.info.run_name == f"tiny{workers}"]
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    grounding = {"L-grounding", "S-grounding"} if workers == 2 else set()
    assert len(parent) == 1 and set(stages) == {"L-direct", "S-direct"} | grounding
    assert parent[0].info.status == "FINISHED" and "L-direct/f1" in parent[0].data.metrics
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(stages["S-direct"].info.run_id, "loss")) >= 2
    assert "test/hallucination/f1" in stages["S-direct"].data.metrics

    # Running again skips finished stages and leaves their models untouched.
    mtime = (run_dir / "models" / "S" / "model.safetensors").stat().st_mtime
    assert main(["run", _config(tmp_path, workers), "--run-dir", str(run_dir)]) == 0
    assert "[S-direct] already finished: skipped" in capsys.readouterr().out
    assert (run_dir / "models" / "S" / "model.safetensors").stat().st_mtime == mtime

    # The same run dir under a changed config is refused before any work: its results would not match.
    assert main(["run", _config(tmp_path, workers), "--run-dir", str(run_dir), "--set", "seed=7"]) == 2
    first = "L-grounding" if workers == 2 else "L-direct"  # the first stage of the plan is named
    assert f"{first}.json: this stage was finished with a different config" in capsys.readouterr().err
    assert (run_dir / "models" / "S" / "model.safetensors").stat().st_mtime == mtime
