"""`ray job submit` round trip against a local head started here (127.0.0.1, token auth on): two runs of the
documented command at once both reach SUCCEEDED, `ray job logs` shows their stages, and each lands in its own
run dir and its own MLflow run at the tracking URI passed through the runtime env. The second job tunes with
LoRA, so the same round trip shows a LoRA stage training only its adapter."""

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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = "{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"
# The quickstart shrunk to one tiny level tuned directly: the job round trip, not the method, is under test.
SHRINK = [f"levels={{S: {TINY}}}", "direct.levels=[S]", "ppod.enabled=false", "tcrd.enabled=false",
          "vocab_size=512", "data.synth={train: 8, val: 4, test: 4}", "direct.train={epochs: 1, batch_size: 4}",
          "resources.cpus_per_worker=1"]
LORA = "direct.train={epochs: 1, batch_size: 4, lora: {r: 4, target_modules: [q_proj, v_proj]}}"
EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlflow.db", "**/__pycache__"]


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
        for sig in (signal.SIGTERM, signal.SIGKILL):  # this head's process group only
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, **kw)


def _submit(head: dict, job_id: str, run_dir: Path, uri: str, extra: list[str]) -> subprocess.Popen:
    """The command of docs/cluster.md: working dir = this checkout, the tracking URI through the runtime env."""
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"},
                   "excludes": EXCLUDES}
    sets = [arg for item in SHRINK + extra + [f"name={job_id}"] for arg in ("--set", item)]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", job_id,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           "hkd", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir), *sets]
    return subprocess.Popen(cmd, env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_jobs_at_once_succeed_apart(head, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    jobs = {name: _submit(head, name, tmp_path / "runs" / name, uri, extra)
            for name, extra in (("job-a", []), ("job-b", [LORA]))}
    for name, proc in jobs.items():
        out, _ = proc.communicate(timeout=900)  # a hang guard only: a busy shared machine is slow
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
    for name in jobs:
        status = _ray(["job", "status", "--address", head["address"], name], head["env"])
        assert f"Job '{name}' succeeded" in status.stdout, status.stdout + status.stderr
        logs = _ray(["job", "logs", "--address", head["address"], name], head["env"]).stdout
        assert "[S-direct] training S (direct)" in logs and "[S-direct] done in" in logs, logs[-2000:]
        run_dir = tmp_path / "runs" / name
        assert json.loads((run_dir / "config.json").read_text())["name"] == name
        assert (run_dir / "models" / "S" / "model.safetensors").is_file()

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["hkd4vlm"], output_format="list")
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"job-a", "job-b"}
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED" and parent.data.tags["run_dir"] == str(tmp_path / "runs" / name)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [c.info.run_name for c in children] == ["S-direct"]

    lora_run = tmp_path / "runs" / "job-b" / "models"
    assert (lora_run / "S" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "runs" / "job-a" / "models" / "S" / "adapter").exists()
    before, after = (load_file(str(lora_run / d / "model.safetensors")) for d in ("init/S", "S"))
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed == {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))}


def test_wrong_token_is_refused(head):
    wrong = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    listed = _ray(["job", "list", "--address", head["address"]], wrong)
    assert listed.returncode != 0
