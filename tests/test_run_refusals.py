"""`hkd run` refuses bad input before any work: exit code 2, a message naming the key path or FILE:LINE, and
nothing written that looks finished (no stage results, no trained model dirs)."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest

from orchestrator.cli import main
from tests.conftest import TINY
from workers.data import synth
from workers.models.model_dirs import build_level, build_tokenizer

SHAPE = ("{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, "
         "vision_heads: 2}")


def _config(tmp_path, extra: str = "", levels: str = f"{{S: {SHAPE}}}", data: str = "", direct: str = "S") -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"""
name: refusals
vocab_size: 1024
data: {data or '{source: synth, synth: {train: 4, val: 2, test: 2}}'}
levels: {levels}
direct: {{levels: [{direct}], train: {{epochs: 1, batch_size: 4}}}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
{extra}
""")
    return str(path)


def _refused(tmp_path, capsys, config: str, *args: str) -> str:
    run_dir = tmp_path / "runs" / "r"
    assert main(["run", config, "--run-dir", str(run_dir), *args]) == 2
    assert not (run_dir / "stages").exists() and not list(run_dir.glob("models/*/model.safetensors"))
    return capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("direct.train.lr=-1", "'direct.train.lr': Input should be greater than 0"),
    ("teachers.k=ten", "'teachers.k': Input should be a valid integer"),
    ("levels.S.hiden=64", "unknown key 'levels.S.hiden' (did you mean 'hidden'?)"),
])
def test_bad_config_value_refused_with_key_path(tmp_path, capsys, override, message):
    err = _refused(tmp_path, capsys, _config(tmp_path), "--set", override)
    assert message in err and not (tmp_path / "runs").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_refused_before_training(tmp_path, capsys):
    uri = f"http://user:hunter2@127.0.0.1:{_closed_port()}"
    start = time.time()
    err = _refused(tmp_path, capsys, _config(tmp_path, f"tracking: {{uri: '{uri}'}}"))
    assert time.time() - start < 60, "a dead tracking server must be refused quickly"
    assert "tracking.uri: MLflow tracking store http://***@127.0.0.1" in err and "hunter2" not in err
    run_dir = tmp_path / "runs" / "r"  # only the log that holds the refusal (issue 15): no run.json, data, stages
    assert [p.relative_to(run_dir).as_posix() for p in sorted(run_dir.rglob("*"))] == ["logs", "logs/hkd.log"]
    assert "hunter2" not in (run_dir / "logs" / "hkd.log").read_text()


def test_bad_data_line_refused_with_file_line(tmp_path, capsys, bench_dir):
    train = tmp_path / "train.jsonl"
    lines = (bench_dir / "factuality" / "train.jsonl").read_text().splitlines()
    for image in {json.loads(line)["image"] for line in lines}:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bench_dir / "factuality" / image, tmp_path / image)
    train.write_text("\n".join(lines[:2] + ['{"id": "x", "task": "factuality"}']) + "\n")
    data = f"{{source: files, files: {{train: ['{train}'], test: ['{train}']}}}}"
    config = _config(tmp_path, data=data)
    err = _refused(tmp_path, capsys, config)
    assert f"{train}:3: missing field" in err
    assert f"`hkd data validate --labels --config {config} {train}` lists every bad line of the file" in err


def test_image_above_max_image_pixels_refused_with_file_line(tmp_path, capsys):
    err = _refused(tmp_path, capsys, _config(tmp_path), "--set", "data.max_image_pixels=1000")
    data = tmp_path / "runs" / "r" / "data"
    assert f"{data / 'hallucination' / 'train.jsonl'}:1: image is 112x112 = 12,544 pixels, above " \
           "data.max_image_pixels (1,000)" in err


def test_prompt_longer_than_the_context_refused_before_training(tmp_path, capsys, bench_dir):
    train = tmp_path / "train.jsonl"
    lines = (bench_dir / "factuality" / "train.jsonl").read_text().splitlines()
    for image in {json.loads(line)["image"] for line in lines}:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bench_dir / "factuality" / image, tmp_path / image)
    long = json.loads(lines[1])
    long["context"] = " ".join(["the red square is left of the blue circle"] * 600)
    train.write_text("\n".join([lines[0], json.dumps(long), *lines[2:4]]) + "\n")
    data = f"{{source: files, files: {{train: ['{train}'], test: ['{train}']}}}}"
    err = _refused(tmp_path, capsys, _config(tmp_path, data=data))
    assert f"{train}:2: prompt is " in err and "longer than the model's context of 4,096 tokens (levels.S)" in err
    assert f"--model-dir {tmp_path / 'runs' / 'r' / 'models' / 'init' / 'S'} {train}`" in err


def test_generated_data_longer_than_a_path_levels_context_refused(tmp_path, capsys, tiny_model_dir):
    """The generated benchmark's prompts are checked too: a level given by `path` may have a short context."""
    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 48
    (short / "config.json").write_text(json.dumps(config))
    err = _refused(tmp_path, capsys, _config(tmp_path, levels=f"{{S: {{path: '{short}'}}}}"))
    train = tmp_path / "runs" / "r" / "data" / "hallucination" / "train.jsonl"
    assert f"{train}:1: prompt is " in err and "longer than the model's context of 48 tokens (levels.S)" in err


def test_unlabelled_input_longer_than_the_context_refused_before_training(tmp_path, capsys, bench_dir):
    """The teachers answer for the unlabelled inputs too (the teacher cache is filled with them): their prompts are
    checked like the splits'."""
    lines = (bench_dir / "factuality" / "train.jsonl").read_text().splitlines()
    for image in {json.loads(line)["image"] for line in lines}:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bench_dir / "factuality" / image, tmp_path / image)
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:4]) + "\n")
    long = {**json.loads(lines[4]), "id": "u2",
            "context": " ".join(["the red square is left of the blue circle"] * 600)}
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text(lines[5] + "\n" + json.dumps(long) + "\n")
    data = (f"{{source: files, files: {{train: ['{tmp_path / 'train.jsonl'}'], test: ['{tmp_path / 'train.jsonl'}']}}, "
            f"unlabeled: ['{unlabeled}']}}")
    extra = "ppod: {enabled: true, stages: [{student: S, teachers: [{level: L}]}]}"
    err = _refused(tmp_path, capsys, _config(tmp_path, extra, levels=f"{{L: {SHAPE}, S: {SHAPE}}}", data=data,
                                             direct="L"))
    assert f"{unlabeled}:2: prompt is " in err and "longer than the model's context of 4,096 tokens (levels." in err


def test_incomplete_level_model_dir_refused(tmp_path, capsys, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    err = _refused(tmp_path, capsys, _config(tmp_path, levels=f"{{S: {{path: '{broken}'}}}}"))
    assert f"levels.S.path: {broken}: not a complete model dir (model.safetensors missing)" in err


def test_top_k_kd_across_tokenizers_refused_before_training(tmp_path, capsys, tiny_model_dir):
    """Two tokenizers: `auto` distils over the label words; asking for top-k over a vocabulary they do not share
    is refused, saying what applies."""
    other = build_level(tmp_path / "other", TINY, build_tokenizer(synth.sample_texts(20, seed=3), vocab_size=600),
                        image_size=112)
    extra = "ppod: {enabled: true, kd_over: top_k, stages: [{student: S, teachers: [{level: L}]}]}"
    levels = f"{{L: {{path: '{tiny_model_dir}'}}, S: {{path: '{other}'}}}}"
    err = _refused(tmp_path, capsys, _config(tmp_path, extra, levels=levels, direct="L"))
    assert "ppod.kd_over: top_k needs one shared tokenizer, but levels.L (teacher of S+PPOD) has 512 tokens" in err
    assert "levels.S 600 tokens" in err and "label-word KD is what applies across tokenizers" in err
