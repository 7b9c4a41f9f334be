"""cluster.yaml and configs/cluster/local.yaml pass Ray's own cluster-launcher validation (what `ray up` runs)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


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
    assert "." in config["file_mounts"].values()


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
