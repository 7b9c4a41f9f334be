"""`hkd data synth|validate` and `hkd evaluate`: outputs, and loader errors as FILE:LINE with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from orchestrator.cli import main


def _hkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True)


def test_synth_then_validate(tmp_path):
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--train", "6", "--val", "2", "--test", "2"]) == 0
    proc = _hkd("data", "validate", str(out / "hallucination" / "train.jsonl"), str(out / "factuality" / "val.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "hallucination: 6 records" in proc.stdout and "factuality: 2 records" in proc.stdout


def test_synth_from_a_config_uses_its_generator_and_flags_override(tmp_path):
    """`--config` takes the run's seed, counts and spec (here `--set` narrows it); another `--seed` is a fresh draw
    of the same distribution; `--test` overrides one count."""
    cfg = ["--config", "configs/quickstart.yaml", "--set", "data.synth.max_objects=2",
           "--set", "data.synth.train=4", "--set", "data.synth.val=2"]
    assert main(["data", "synth", "--out", str(tmp_path / "a"), *cfg, "--test", "3"]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "b"), *cfg, "--test", "3", "--seed", "9"]) == 0
    meta_a, meta_b = (json.loads((tmp_path / d / "meta.json").read_text()) for d in "ab")
    assert meta_a["counts"]["factuality"] == {"train": 4, "val": 2, "test": 3}
    assert meta_a["seed"] == 0 and meta_b["seed"] == 9
    assert meta_a["spec"] == meta_b["spec"] and meta_a["spec"]["max_objects"] == 2
    test_a, test_b = ((tmp_path / d / "factuality" / "test.jsonl").read_text() for d in "ab")
    assert test_a != test_b
    assert max(len(json.loads(line)["scene"]["objects"]) for line in test_a.splitlines()) <= 2


BAD_LINES = {
    "invalid JSON": ("{not json", "invalid JSON"),
    "missing field": ('{"id": "a", "task": "factuality", "image": "i.png", "context": "c", "label": true}',
                      "missing field 'claim'"),
    "wrong type": ('{"id": "a", "task": "factuality", "image": "i.png", "context": "c", "claim": "x", "label": 1}',
                   "field 'label': expected boolean"),
    "unknown task": ('{"id": "a", "task": "vqa", "image": "i.png"}', "unknown task 'vqa'"),
    "empty options": ('{"id": "a", "task": "hallucination", "image": "i.png", "caption": "c", "options": [], '
                      '"hallucinated": []}', "field 'options' is empty"),
    "length mismatch": ('{"id": "a", "task": "hallucination", "image": "i.png", "caption": "c", "options": ["x"], '
                        '"hallucinated": [true, false]}', "has 1 items but 'hallucinated' has 2"),
    "missing image": ('{"id": "a", "task": "factuality", "image": "nope.png", "context": "c", "claim": "x", '
                      '"label": true}', "image not found"),
    "undecodable image": ('{"id": "a", "task": "factuality", "image": "bad.png", "context": "c", "claim": "x", '
                          '"label": true}', "cannot decode image"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_validate_errors_name_file_line_and_exit_2(tmp_path, case):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    good = '{"id": "g", "task": "factuality", "image": "i.png", "context": "c", "claim": "x", "label": false}'
    line, message = BAD_LINES[case]
    path = tmp_path / "f.jsonl"
    path.write_text(good + "\n" + line + "\n")
    proc = _hkd("data", "validate", str(path))
    assert proc.returncode == 2
    assert f"{path}:2: " in proc.stderr and message in proc.stderr


def test_duplicate_id_and_empty_file_exit_2(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    rec = {"id": "a", "task": "factuality", "image": "i.png", "context": "c", "claim": "x", "label": True}
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    proc = _hkd("data", "validate", str(dup))
    assert proc.returncode == 2 and f"{dup}:2: duplicate id 'a' (first seen at line 1)" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = _hkd("data", "validate", str(empty))
    assert proc.returncode == 2 and "file is empty" in proc.stderr


def test_evaluate_json_lines(tiny_model_dir, bench_dir, capsys):
    files = [str(bench_dir / "hallucination" / "test.jsonl"), str(bench_dir / "factuality" / "test.jsonl")]
    assert main(["evaluate", str(tiny_model_dir), *files, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["file"], r["task"]) for r in rows] == [(files[0], "hallucination"), (files[1], "factuality")]
    for row in rows:
        assert set(row) == {"file", "task", "n", "f1", "accuracy", "auroc", "ece"} and row["n"] > 0
        assert 0 <= row["f1"] <= 1 and 0 <= row["ece"] <= 1


def test_evaluate_incomplete_model_dir_exits_2(tiny_model_dir, bench_dir, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    assert main(["evaluate", str(broken), str(bench_dir / "factuality" / "test.jsonl")]) == 2
    assert f"{broken}: not a complete model dir (model.safetensors missing)" in capsys.readouterr().err
