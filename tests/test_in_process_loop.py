"""One training loop: a direct stage run in this process (`workers.training.loop.run_in_process`) is the stage
`hkd run` trains under Ray Train, step for step, and its checkpoints resume it as a Ray Train restart would.

The stage is built the way the pipeline builds it (`stage_job` of a `StagePlan`, the run config's default stage
loss, the rows `encode_split` encodes); under Ray Train it runs through `fit_stage` (local Ray, one worker) and
its per-step losses are read back from its MLflow run; in process the same job's losses come through `on_log`.
"""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
import ray
import torch

from orchestrator.config.schema import Resources, RunConfig, TrainConfig
from orchestrator.cluster.placement import init_ray
from orchestrator.run.kinds import DIRECT, StagePlan
from orchestrator.run.stages import default_stage_loss, fit_stage, one_worker_iterators, stage_job, stage_tracking, train_datasets
from orchestrator.run.inputs import encode_split
from orchestrator.report.tracking import using_store
from workers.data import synth
from workers.data.records import load_jsonl
from workers.models.model_dirs import load_model_dir
from workers.models.prompts import encode_with, record_units
from workers.training.context import CHECKPOINT_PREFIX, ColumnDataset
from workers.training.loop import run_in_process, shuffled_batches

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

RES = Resources(num_workers=1, cpus_per_worker=1, dashboard=False)
EPOCHS, BATCH = 2, 4


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_model_dir, records, bench_dir):
    """The direct stage's job and splits, and its per-step losses and final metrics under Ray Train."""
    tmp = tmp_path_factory.mktemp("in_process")
    splits = {"train": records, "val": [r for t in synth.TASKS for r in load_jsonl(bench_dir / t / "val.jsonl")]}
    _, processor = load_model_dir(tiny_model_dir)
    cfg = RunConfig(levels={"S": {}}, direct={"levels": ["S"]}, resources=RES)
    plan = StagePlan("S-direct", "S", DIRECT, None, TrainConfig(epochs=EPOCHS, batch_size=BATCH, log_every=1))
    uri = f"sqlite:///{tmp}/mlflow.db"
    init_ray(RES)
    try:
        encoded = {s: encode_split(rows, processor) for s, rows in splits.items()}
        sets = train_datasets(encoded["train"], None)
        with using_store(uri, "in-process"), mlflow.start_run(run_name="S-direct") as run:
            job = stage_job(cfg, plan, tiny_model_dir, tmp / "ray_out", default_stage_loss(), sets,
                            encoded["train"].count(), stage_tracking(uri))
            metrics = fit_stage("S-direct", job, sets, encoded["val"], RES, tmp / "ray")
        # the training rows in three blocks, read as a one-worker stage reads them, in windows across blocks
        blocks = one_worker_iterators({"train": encoded["train"].repartition(3)})["train"]
        ray_order = [b["uid"].tolist() for b in shuffled_batches(blocks, 5, job.seed, 1, window=7)]
    finally:
        ray.shutdown()
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    columns = {s: encode_with(record_units(rows), processor) for s, rows in splits.items()}
    return {"job": dataclasses.replace(job, tracking=None), "columns": columns, "metrics": metrics,
            "losses": {m.step: m.value for m in history}, "ray_order": ray_order}


def _in_process(stage: dict, tmp_path, name: str, crash_at: int | None = None) -> tuple[dict, dict]:
    """`run_in_process` of the stage's job into `tmp_path/name`; (losses by step, final metrics), or Crash raised
    once step `crash_at` is logged."""
    logged: dict[int, dict] = {}

    def on_log(step: int, values: dict) -> None:
        logged.setdefault(step, {}).update(values)
        if step == crash_at:
            raise Crash(step)

    job = dataclasses.replace(stage["job"], out_dir=str(tmp_path / name / "out"))
    metrics = run_in_process(job, {"train": stage["columns"]["train"], "val": stage["columns"]["val"]},
                             tmp_path / "storage", on_log=on_log)
    return logged, metrics


def test_column_dataset_batches_rows_as_ray_data_does(stage):
    """`shuffled_batches` over a ColumnDataset: the same batches as over Ray Data's iterator of the same rows, also
    where its windows and the batches cross block boundaries and leave a remainder."""
    ours = shuffled_batches(ColumnDataset(stage["columns"]["train"]), 5, stage["job"].seed, 1, window=7)
    assert [b["uid"].tolist() for b in ours] == stage["ray_order"] and len(stage["ray_order"]) == 24 // 5


def test_a_direct_stage_learns_the_same_in_process_as_under_ray_train(stage, tmp_path):
    threads = torch.get_num_threads()
    logged, metrics = _in_process(stage, tmp_path, "whole")
    steps_per_epoch = len(stage["columns"]["train"]["uid"]) // BATCH
    assert stage["losses"] and len(stage["losses"]) == EPOCHS * steps_per_epoch
    assert {s: v["loss"] for s, v in logged.items() if "loss" in v} == stage["losses"]  # bitwise, same threads
    assert "val/factuality/f1" in logged[steps_per_epoch] and "val/f1" in logged[EPOCHS * steps_per_epoch]
    same = {k for k in stage["metrics"] if k != "train_samples_per_s"}
    assert {k: metrics[k] for k in same} == {k: stage["metrics"][k] for k in same}
    assert torch.get_num_threads() == threads  # the job's threads only while it ran
    assert (tmp_path / "whole" / "out" / "config.json").is_file()


def test_an_in_process_run_resumes_from_its_latest_checkpoint(stage, tmp_path):
    """Killed in epoch 2, the stage run again on the same storage starts from epoch 1's checkpoint and ends as the
    uninterrupted run did."""
    steps_per_epoch = len(stage["columns"]["train"]["uid"]) // BATCH
    with pytest.raises(Crash):
        _in_process(stage, tmp_path, "killed", crash_at=steps_per_epoch + 2)
    assert [p.name for p in (tmp_path / "storage").iterdir() if p.name.startswith(CHECKPOINT_PREFIX)] == \
        [f"{CHECKPOINT_PREFIX}000000"]  # epoch 1's; none of epoch 2 yet
    logged, _ = _in_process(stage, tmp_path, "resumed")
    assert logged[steps_per_epoch]["resumed_from_step"] == steps_per_epoch
    assert min(s for s, v in logged.items() if "loss" in v) == steps_per_epoch + 1
    assert {s: v["loss"] for s, v in logged.items() if "loss" in v} == \
        {s: v for s, v in stage["losses"].items() if s > steps_per_epoch}
