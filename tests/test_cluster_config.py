"""cluster.yaml and configs/cluster/*.yaml pass Ray's own cluster-launcher validation and file hashing (what
`ray up` runs before and while it contacts the nodes)."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import hash_runtime_conf, prepare_config, validate_config

from tests.conftest import ROOT, copy_checkout

CLUSTER_CONFIGS = ["cluster.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("configs/cluster/*.yaml"))]


def _validated(raw: dict) -> dict:
    """`ray up`'s own steps before it contacts a provider: fill defaults, then schema and consistency checks."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_aws_cluster_yaml_is_valid_and_has_teacher_and_student_nodes():
    config = _validated(_load("cluster.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    roles = {name: t["resources"] for name, t in types.items() if t["resources"].get("GPU")}
    assert {r for res in roles.values() for r in res} >= {"teacher", "student"}
    assert all(types[n]["max_workers"] >= types[n]["min_workers"] for n in roles)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch" in c and "--index-url" in c)
    package_at = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ~/hkd4vlm" in c)
    assert torch_at < package_at and "ray[default]" in setup[package_at]


def test_local_cluster_yaml_is_valid_loopback():
    raw = _load("configs/cluster/local.yaml")
    config = _validated(raw)
    assert config["provider"]["head_ip"] == "127.0.0.1"
    assert config["max_workers"] == len(raw["provider"]["worker_ips"])
    assert any("--resources" in c for c in config["head_start_ray_commands"])


def test_schema_refuses_a_misspelt_key():
    raw = _load("cluster.yaml")
    raw["available_node_types"]["gpu_teacher"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _validated(raw)


def test_min_workers_over_the_global_bound_is_refused():
    raw = _load("cluster.yaml")
    raw["available_node_types"]["gpu_student"]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _validated(raw)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """This checkout as a user has it after the quickstart (what git does not ignore, copied), plus
    runs/quickstart, finished, whose Ray session is gone: its note names a session dir that no longer exists, and
    the link into that session's logs that hkd made before issue 34 dangles."""
    tree = copy_checkout(tmp_path / "hkd4vlm")
    logs = tree / "runs" / "quickstart" / "logs"
    logs.mkdir(parents=True)
    (logs.parent / "report.json").write_text(json.dumps({"rows": {}}))
    (logs / "hkd.log").write_text("==== hkd run configs/quickstart.yaml\n")
    gone = tmp_path / "ray" / "session_2026-12-05_10-00-00_000000_1"
    (logs / "ray-session.txt").write_text(f"Ray session {gone}: its logs are in {gone / 'logs'} on this machine\n")
    (logs / "ray").symlink_to(gone / "logs")
    return tree


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_ray_up_hashes_the_mounts_of_a_checkout_holding_a_finished_run(name, checkout, monkeypatch):
    """Ray's own hash_runtime_conf, called as `ray up` calls it, from the checkout's root: it reads every file
    under each mounted path (no exclusion applies), so no mount may hold runs/: a dangling link there stopped
    `ray up` with FileNotFoundError (issue 34), and a new result there must not count as a change to ship."""
    config = _validated(yaml.safe_load((checkout / name).read_text()))
    monkeypatch.chdir(checkout)
    _, before = hash_runtime_conf(config["file_mounts"], None, config, generate_file_mounts_contents_hash=True)
    (checkout / "runs" / "quickstart" / "report.json").write_text(json.dumps({"rows": {"S-direct": {}}}))
    _, after = hash_runtime_conf(config["file_mounts"], None, config, generate_file_mounts_contents_hash=True)
    assert before == after


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_mounts_ship_what_the_setup_installs_under_one_root(name):
    """`pip install -e <root>` on each node needs pyproject.toml, its readme and its packages, side by side."""
    config = _validated(_load(name))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    need = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["packages"], "configs",
            "bases"}  # the shipped configs and the bases they start from
    mounts = {Path(local).as_posix(): Path(remote) for remote, local in config["file_mounts"].items()}
    assert need <= set(mounts), need - set(mounts)
    roots = {remote.parent.as_posix().replace(f"/home/{config['auth']['ssh_user']}", "~") for remote in mounts.values()}
    assert len(roots) == 1 and all(remote.name == local for local, remote in mounts.items()), mounts
    root = roots.pop()
    assert any(f"pip install -q -e {root} " in c for c in config["setup_commands"]), root
