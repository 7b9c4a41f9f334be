"""`ray job submit` round trip against a local head started here (127.0.0.1, token auth on): two runs of the
documented command at once both reach SUCCEEDED, `ray job logs` shows their stages, and each lands in its own
run dir and its own MLflow run at the tracking URI passed through the runtime env.

The two jobs also carry what only they exercise, so the suite pays for these stages once:
- job-a trains with 2 workers (DDP over gloo), grounding-pretrained first, so DDP runs in both loops, and
  validates every step (rank 0 scores mid-epoch while the other worker waits at its all-reduce);
- job-b tunes with LoRA: a LoRA stage trains only its adapter.
One-worker runs of the same path are end-to-end tested in test_distill_pipeline, test_faults and test_sweep."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from orchestrator.cli import main
from orchestrator.cluster.faults import alive_in_group
from workers.inference.calibration import load_shift

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"
# The quickstart shrunk to one tiny level tuned directly: the job round trip, not the method, is under test.
SHRINK = [f"levels={{S: {TINY}}}", "direct.levels=[S]", "ppod.enabled=false", "tcrd.enabled=false",
          "vocab_size=1024", "data.synth={train: 8, val: 4, test: 4}", "direct.train={epochs: 1, batch_size: 4}",
          "direct.overrides={}",
          "resources.cpus_per_worker=1"]
LORA = ["direct.train={epochs: 1, batch_size: 4, lora: {r: 4, target_modules: [q_proj, v_proj]}}"]
DDP = ["resources.num_workers=2", "pretrain={enabled: true, steps: 2, batch_size: 2, log_every: 1}",
       "direct.train={epochs: 2, batch_size: 4, log_every: 1, eval_every: 1}"]
EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlflow.db", "**/__pycache__", ".hypothesis"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head():
    """A Ray head of our own: its own temp dir (so no other process's `ray.init()` finds it through
    /tmp/ray/ray_current_cluster), its own ports, token auth with a fresh token. `ray start` returns once the
    node is up; its processes stay in the process group started here, and teardown ends that group, never
    `ray stop` (which stops every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="hkdj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_raylet_start_wait_time_s": "300"}  # a busy shared machine registers the raylet slowly
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"ray start failed:\n{out[-3000:]}"
        deadline = time.time() + 120
        while _ray(["job", "list", "--address", address], env).returncode:
            assert time.time() < deadline, "the Ray head's job server did not come up"
            time.sleep(2)
        yield {"address": address, "env": env}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # this head's process group only, given 5 s to exit
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + 5
            while alive_in_group(proc.pid) and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, **kw)


def _sets(job_id: str, extra: list[str]) -> list[str]:
    return [arg for item in SHRINK + extra + [f"name={job_id}"] for arg in ("--set", item)]


def _submit(head: dict, job_id: str, run_dir: Path, uri: str, extra: list[str]) -> subprocess.Popen:
    """The command of docs/cluster.md: working dir = this checkout, the tracking URI through the runtime env."""
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"},
                   "excludes": EXCLUDES}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", job_id,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           "hkd", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir), *_sets(job_id, extra)]
    return subprocess.Popen(cmd, env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_jobs_at_once_succeed_apart(head, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    jobs = {name: _submit(head, name, tmp_path / "runs" / name, uri, extra)
            for name, extra in (("job-a", DDP), ("job-b", LORA))}
    for name, proc in jobs.items():
        out, _ = proc.communicate(timeout=900)  # a hang guard only: a busy shared machine is slow
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
    for name in jobs:
        status = _ray(["job", "status", "--address", head["address"], name], head["env"])
        assert f"Job '{name}' succeeded" in status.stdout, status.stdout + status.stderr
        logs = _ray(["job", "logs", "--address", head["address"], name], head["env"]).stdout
        assert "[S-direct] training S (direct)" in logs and "[S-direct] done in" in logs, logs[-2000:]
        assert "| S-direct |" in logs
        run_dir = tmp_path / "runs" / name
        assert json.loads((run_dir / "config.json").read_text())["name"] == name
        assert (run_dir / "models" / "S" / "model.safetensors").is_file()

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["hkd4vlm"], output_format="list")
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"job-a", "job-b"}
    children = {}
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED" and parent.data.tags["run_dir"] == str(tmp_path / "runs" / name)
        assert "S-direct/f1" in parent.data.metrics
        children[name] = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children["job-a"]) == {"S-grounding", "S-direct"} and set(children["job-b"]) == {"S-direct"}

    _assert_two_workers(tmp_path / "runs" / "job-a", children["job-a"])
    _assert_lora_trains_only_its_adapter(tmp_path / "runs")

    # The same run dir under a changed config is refused before any work: its results would not match.
    sets = _sets("job-a", DDP + ["seed=7"])
    assert main(["run", str(ROOT / "configs" / "quickstart.yaml"), "--run-dir", str(tmp_path / "runs" / "job-a"),
                 *sets]) == 2
    assert "S-grounding.json: this stage was finished with a different config" in capsys.readouterr().err


def _assert_two_workers(run_dir: Path, stages: dict) -> None:
    """job-a: both stages ran on 2 workers, and its report, shift, type breakdown and learning curve are whole."""
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["rows"]) == ["S-direct", "S-direct+shift"]
    for row in report["rows"].values():
        for task in ("hallucination", "factuality"):
            assert 0 <= row[task]["f1"] <= 1 and row[task]["auroc"] is not None
    assert set(load_shift(run_dir / "models" / "S")) == {"hallucination", "factuality"}
    stage = json.loads((run_dir / "stages" / "S-direct.json").read_text())
    assert stage["val"]["world_size"] == 2 and stage["val"]["steps"] >= 2
    _assert_type_breakdown(report, run_dir)
    ground = json.loads((run_dir / "stages" / "S-grounding.json").read_text())
    assert ground["val"]["steps"] == 2 and 0 <= ground["val"]["grounding_accuracy"] <= 1
    assert (run_dir / "models" / "S-grounding" / "model.safetensors").is_file()
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(stages["S-direct"].info.run_id, "loss")) >= 2
    assert "test/hallucination/f1" in stages["S-direct"].data.metrics
    # The learning curve: validation macro-F1 at every step (2 steps per epoch, 2 epochs), each scored once.
    for task in ("hallucination", "factuality"):
        curve = client.get_metric_history(stages["S-direct"].info.run_id, f"val/{task}/f1")
        assert sorted(m.step for m in curve) == [1, 2, 3, 4] and all(0 <= m.value <= 1 for m in curve)


def _assert_type_breakdown(report: dict, run_dir: Path) -> None:
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


def _assert_lora_trains_only_its_adapter(runs: Path) -> None:
    lora_run = runs / "job-b" / "models"
    assert (lora_run / "S" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (runs / "job-a" / "models" / "S" / "adapter").exists()
    before, after = (load_file(str(lora_run / d / "model.safetensors")) for d in ("init/S", "S"))
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed == {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))}


def test_wrong_token_is_refused(head):
    wrong = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    listed = _ray(["job", "list", "--address", head["address"]], wrong)
    assert listed.returncode != 0
