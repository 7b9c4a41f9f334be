"""Only safe files load: safetensors weights, `torch.load(weights_only=True)`, no pickle from user files; a
model's own code runs only on opt-in; secrets never reach MLflow params or logs."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.report.tracking import flatten, masked
from workers.models.model_dirs import ModelDirError, load_model_dir

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("orchestrator", "workers", "bench") for p in (ROOT / d).rglob("*.py"))


def _calls(name: str):
    """(file, call node) for every call of `<anything>.name(...)` or `name(...)` in the project's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def test_every_torch_load_is_weights_only():
    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if isinstance(n.func, ast.Attribute)
                   and getattr(n.func.value, "id", None) == "torch"]
    assert torch_loads, "expected the checkpoint loader's torch.load"
    for path, node in torch_loads:
        flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        assert flags.get("weights_only") is True, f"{path}:{node.lineno}: torch.load without weights_only=True"


@pytest.mark.parametrize("name", ["loads", "load", "Unpickler"])
def test_no_pickle_loading(name):
    for path, node in _calls(name):
        owner = getattr(node.func, "value", None)
        assert getattr(owner, "id", None) not in ("pickle", "cloudpickle", "dill"), f"{path}:{node.lineno}"


def _pickle_bomb(marker: Path) -> dict:
    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))
    return {"weight": Bomb()}


def test_pickled_weights_are_refused_unrun(tiny_model_dir, tmp_path):
    """A model dir whose weights are a pickle (`pytorch_model.bin`) is refused; its payload never runs."""
    model_dir, marker = tmp_path / "pickled", tmp_path / "payload-ran"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save(_pickle_bomb(marker), model_dir / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="model.safetensors missing"):
        load_model_dir(model_dir)
    assert not marker.exists()


CUSTOM_CODE = '''
from pathlib import Path
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

Path({marker!r}).touch()


class CustomConfig(Qwen2_5_VLConfig):
    model_type = "hkd_custom"


class CustomModel(Qwen2_5_VLForConditionalGeneration):
    config_class = CustomConfig
'''


@pytest.fixture()
def custom_code_dir(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """A model dir that needs its own Python code (like InternVL's), which touches a marker when it runs."""
    model_dir, marker = tmp_path / "custom", tmp_path / "code-ran"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="hkd_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForImageTextToText": "custom.CustomModel"})
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir, marker


def test_remote_code_off_by_default(custom_code_dir):
    model_dir, marker = custom_code_dir
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model_dir(model_dir)
    assert not marker.exists()


def test_remote_code_on_opt_in_warns_naming_the_model(custom_code_dir):
    model_dir, marker = custom_code_dir
    with pytest.warns(UserWarning, match=f"trust_remote_code is on for {model_dir}"):
        model, _ = load_model_dir(model_dir, trust_remote_code=True)
    assert marker.exists() and type(model).__name__ == "CustomModel"


def test_secrets_masked_everywhere_they_are_logged():
    cfg = {"tracking": {"uri": "https://alice:s3cr3t@mlflow.example.com/", "experiment": "e"},
           "data": {"synth": {"spec": {"api_key": "k1", "hf_token": {"nested": "k2"}}}},
           "files": ["s3://id:k3@bucket/train.jsonl"], "seed": 1}
    text = json.dumps(masked(cfg)) + json.dumps(flatten(cfg))
    for secret in ("s3cr3t", "alice", "k1", "k2", "k3"):
        assert secret not in text, secret
    assert masked(cfg)["tracking"]["uri"] == "https://***@mlflow.example.com/"
    assert flatten(cfg)["data.synth.spec.hf_token"] == "***" and flatten(cfg)["seed"] == "1"
