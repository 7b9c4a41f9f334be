"""`hkd sweep`: the sweep file is validated like the run config; a 2-trial TCRD sweep over saved teachers records a
parent MLflow run with a child per trial, writes a ready-to-run best.yaml, and its second trial computes no
teacher forward (the cache answers)."""

from __future__ import annotations

import shutil
import time

import mlflow
import pytest
import ray
import yaml
from ray.util.placement_group import placement_group

from orchestrator.cli import main
from orchestrator.config.schema import ConfigError, load_config
from orchestrator.cluster.orphans import remove_orphaned_placement_groups
from orchestrator.run.levels import init_levels
from orchestrator.sweep.config import load_sweep

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"
BASE = f"""
name: base
vocab_size: 1024
data: {{source: synth, synth: {{train: 6, val: 4, test: 4}}}}
levels: {{L: {TINY}, M: {TINY}, S: {TINY}}}
direct: {{levels: [L, M, S], train: {{epochs: 1, batch_size: 4}}}}
tcrd: {{enabled: true, train: {{epochs: 1, batch_size: 4, log_every: 1}}}}
teachers: {{k: 8, num_cpus: 0.5}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
"""


@pytest.fixture()
def base(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


def _sweep_file(tmp_path, base, run_dir, space: str, extra: str = "") -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\nbase: {base}\nfrom_run: {run_dir}\nstage: tcrd\nspace:\n{space}\n{extra}")
    return str(path)


@pytest.mark.parametrize("space, extra, message", [
    ("  tcrd.ce_weight: {grid: [1.0]}", "num_sample: 2", r"unknown key 'num_sample' \(did you mean 'num_samples'\?\)"),
    ("  tcrd.temprature: {choice: [1.0]}", "", r"space.tcrd.temprature = 1.0: unknown key 'tcrd.temprature' "
                                                r"\(did you mean 'temperature'\?\)"),
    ("  tcrd.temperature: {uniform: [-1.0, 2.0]}", "", r"space.tcrd.temperature = -1.0: 'tcrd.temperature': "
                                                       r"Input should be greater than 0"),
    ("  tcrd.temperature: {uniform: [2.0, 1.0]}", "", r"low < high"),
    ("  tcrd.ce_weight: {grid: [1.0], choice: [2.0]}", "", r"exactly one of grid, choice, uniform, loguniform"),
    ("  tcrd.ce_weight: {gird: [1.0]}", "", r"unknown key 'space.tcrd.ce_weight.gird' \(did you mean 'grid'\?\)"),
    ("  direct.train.lr: {choice: [0.1]}", "", r"only keys under 'tcrd.' or 'augment.'"),
    ("  tcrd.top: {choice: [M]}", "", r"changes which models stage S\+TCRD starts from or learns from"),
    ("  tcrd.ce_weight: {grid: [1.0]}", "stage: tcr", None),
])
def test_sweep_file_is_validated(tmp_path, base, space, extra, message):
    if message is None:  # a wrong stage name: its nearest planned stage is suggested
        path = tmp_path / "sweep.yaml"
        path.write_text(f"base: {base}\nfrom_run: r\nstage: tcr\nspace:\n{space}\n")
        with pytest.raises(ConfigError, match=r"stage 'tcr' is not in the base plan \(did you mean 'tcrd'\?\)"):
            load_sweep(path)
        return
    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep_file(tmp_path, base, "r", space, extra))


def test_shipped_sweep_validates():
    sweep = load_sweep("configs/sweep_tcrd.yaml")
    assert sweep.plan.kind.name == "tcrd" and sweep.base.cache.enabled and len(sweep.spec.space) >= 2


@pytest.fixture()
def from_run(tmp_path, base):
    """A run dir holding what a sweep of TCRD reads: data and the L, M, S models (untrained levels stand in for
    trained ones; the sweep only needs model dirs)."""
    run_dir = tmp_path / "runs" / "base"
    cfg = load_config(base)
    for level, init_dir in init_levels(cfg, run_dir).items():
        shutil.copytree(init_dir, run_dir / "models" / level)
    return run_dir


def test_two_trial_sweep_reuses_teacher_outputs(tmp_path, base, from_run, capsys):
    # No ASHA rung below the last epoch: once the trials' F1 differ (they learn), ASHA would stop the worse one
    # and this test is about the cache, not the scheduler.
    path = _sweep_file(tmp_path, base, from_run, "  tcrd.ce_weight: {grid: [0.25, 2.0]}",
                       "scheduler: {grace_period: 2}\n")
    try:
        assert main(["sweep", path]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "best trial" in out

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hkd4vlm"], output_format="list")
    (parent,) = [r for r in runs if r.info.run_name == "sweep-s"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert sorted(float(t.data.params["space.tcrd.ce_weight"]) for t in trials) == [0.25, 2.0]
    (best,) = [t for t in trials if t.data.tags.get("best") == "true"]
    assert parent.data.tags["best_trial"] == best.data.tags["trial_id"]
    client = mlflow.MlflowClient()
    for t in trials:
        assert len(client.get_metric_history(t.info.run_id, "loss")) >= 1 and "final/f1" in t.data.metrics

    # The first trial filled the cache; the second asked the teachers nothing.
    filled, reused = sorted(trials, key=lambda t: -t.data.metrics["teacher/units"])
    assert filled.data.metrics["teacher/units"] > 0 and reused.data.metrics["teacher/units"] == 0
    assert reused.data.metrics["cache/hits"] == filled.data.metrics["cache/misses"] > 0
    assert parent.data.metrics["teacher_units"] == filled.data.metrics["teacher/units"]  # counted by the actors

    best_yaml = from_run / "sweeps" / "s" / "best.yaml"
    cfg = load_config(best_yaml)
    assert cfg.tcrd.ce_weight == float(best.data.params["space.tcrd.ce_weight"]) and cfg.cache.enabled
    assert yaml.safe_load(best_yaml.read_text())["levels"].keys() == {"L", "M", "S"}


def test_orphaned_worker_group_resources_are_freed():
    """A placement group whose creating actor died (a stopped trial's Train controller) is removed; one the
    driver holds is not."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Controller:
            def reserve(self) -> None:
                self.pg = placement_group([{"CPU": 1}])
                ray.get(self.pg.ready())

        controller = Controller.remote()
        ray.get(controller.reserve.remote())
        held = placement_group([{"CPU": 0.5}])
        ray.get(held.ready())
        assert remove_orphaned_placement_groups() == 0
        ray.kill(controller)
        deadline = time.monotonic() + 30
        while not remove_orphaned_placement_groups():
            assert time.monotonic() < deadline
            time.sleep(0.5)
        while ray.available_resources().get("CPU", 0) < 1.5:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert ray.util.placement_group_table(held)["state"] == "CREATED"
    finally:
        ray.shutdown()
