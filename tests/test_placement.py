"""Placement on a simulated multi-node cluster: teacher actors land on `teacher` nodes, train workers on
`student` nodes, as the config's `placement:` section says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from orchestrator.config.schema import ConfigError, Placement, Resources, load_config
from orchestrator.cluster.placement import local_resources, scaling
from orchestrator.cluster.trainer import StageTrainer
from workers.teachers.pool import TeacherPool

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)


@pytest.fixture()
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"teacher": 2}})
    teacher = c.head_node
    student = c.add_node(num_cpus=2, resources={"student": 2})
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield {"teacher": teacher.node_id, "student": student.node_id}
    ray.shutdown()
    c.shutdown()


def test_teachers_and_workers_land_on_their_nodes(cluster, tiny_model_dir, tmp_path):
    placement = Placement(teacher={"teacher": 1}, student={"student": 1})
    pool = TeacherPool.start("placed", tiny_model_dir, replicas=2, num_cpus=0.5, threads=1,
                             resources=placement.teacher)
    try:
        assert [i["node_id"] for i in pool.info()] == [cluster["teacher"]] * 2
    finally:
        pool.shutdown()

    def where(cfg: dict) -> None:
        rank = ray.train.get_context().get_world_rank()
        Path(cfg["out"], f"{rank}.json").write_text(json.dumps(ray.get_runtime_context().get_node_id()))

    res = Resources(num_workers=2, cpus_per_worker=1)
    StageTrainer(where, train_loop_config={"out": str(tmp_path)}, scaling_config=scaling(res, placement),
                 run_config=TrainRunConfig(name="placed", storage_path=str(tmp_path / "ray"))).fit()
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)] == [cluster["student"]] * 2


def test_defaults_ask_for_no_custom_resources():
    res = Resources()
    assert scaling(res, Placement()).resources_per_worker == {"CPU": 2}
    assert local_resources(Placement(), res, teacher_replicas=2) == {}
    placed = Placement(teacher={"teacher": 1}, student={"student": 0.5})
    assert local_resources(placed, Resources(num_workers=2), teacher_replicas=3) == {"teacher": 6, "student": 1}


def test_placement_refuses_builtin_resources(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("placement: {teacher: {GPU: 1}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*placement.teacher.GPU: CPUs and GPUs are set by"):
        load_config(path)


@pytest.mark.parametrize("private, datasets, dropped", [
    (True, False, {"DatasetsCallback", "PlacementGroupCleanerCallback"}),
    (True, True, {"PlacementGroupCleanerCallback"}),
    (False, False, {"DatasetsCallback"}),
    (False, True, set()),
])
def test_stage_trainer_leaves_out_only_idle_helper_actors(monkeypatch, private, datasets, dropped):
    """A stage starts no dataset manager when it hands its worker the iterators, and no placement-group cleaner
    on hkd's private local Ray (`orchestrator.cluster.trainer`); everything else Ray Train sets up stays."""
    from ray.train import ScalingConfig

    monkeypatch.setenv("HKD_PRIVATE_RAY", "1") if private else monkeypatch.delenv("HKD_PRIVATE_RAY", raising=False)
    sets = {"train": lambda: None} if datasets else None
    ours = StageTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets=sets)
    theirs = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets=sets)
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= _callbacks(theirs)
    assert _callbacks(theirs) - _callbacks(ours) == dropped and _callbacks(ours) <= _callbacks(theirs)


def _callbacks(trainer) -> set[str]:
    return {type(cb).__name__ for cb in trainer._create_default_callbacks()}


def test_only_stages_with_a_process_group_to_connect_get_torch_config(tmp_path):
    """One CPU worker gets Ray Train's plain backend, so the train controller, which unpickles its callbacks
    and run context, never imports torch; several workers or a GPU get `TorchConfig` as `TorchTrainer` does."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    def backend(**scaling) -> object:
        return StageTrainer(lambda: None, scaling_config=ScalingConfig(**scaling)).backend_config

    assert (type(backend(num_workers=2)), backend(num_workers=2).backend) == (TorchConfig, "gloo")
    assert (type(backend(num_workers=1, use_gpu=True)), backend(num_workers=1, use_gpu=True).backend) == (
        TorchConfig, "nccl")
    one = StageTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert not isinstance(one.backend_config, TorchConfig)
    sent = tmp_path / "controller_args.pkl"
    sent.write_bytes(ray.cloudpickle.dumps((one._create_default_callbacks(), one.train_run_context)))
    check = f"import pickle, sys; pickle.loads(open({str(sent)!r}, 'rb').read()); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1]).stdout.strip() == "False"


def test_controller_polls_workers_every_quarter_second_unless_the_user_set_it(monkeypatch):
    """A stage's end is seen at the controller's next poll of its workers: Ray's 2 s default cost every stage
    about a second. hkd's default reaches the controller and workers through Ray Train's propagated env vars;
    a value the user exported wins."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from orchestrator.cluster.trainer import POLL_INTERVAL_ENV

    monkeypatch.delenv(POLL_INTERVAL_ENV, raising=False)
    StageTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert get_env_vars_to_propagate()[POLL_INTERVAL_ENV] == "0.25"
    monkeypatch.setenv(POLL_INTERVAL_ENV, "5")
    StageTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert get_env_vars_to_propagate()[POLL_INTERVAL_ENV] == "5"
