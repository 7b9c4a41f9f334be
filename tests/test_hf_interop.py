"""Issue 32 part 1: every model dir hkd writes loads with plain `transformers` and `peft`, and scores as hkd does.

One tiny level of each family and a LoRA student are written as hkd writes them (`save_model_dir`) and scored by
`hkd predict --no-shift`; a subprocess that imports nothing from hkd (`tests/hf_interop_check.py`, running the
snippet of docs/interop.md) loads each dir with `AutoProcessor`, `AutoModelForImageTextToText` and, for the LoRA
student, `PeftModel.from_pretrained` on its base, and must give the same scores (to 1e-5, float32) and the same
decisions from `generate`'s first token restricted to the two label words.

Without torchvision (this project's CPU torch has none that imports) `transformers` builds no video processor,
so the four families whose own processor class has one (Qwen2.5-VL, Qwen3-VL, SmolVLM, InternVL) cannot come
out of `AutoProcessor` here: it must then fail naming torchvision (never fall back to a bare tokenizer, as it did
on hkd's own class names), and the subprocess scores with the family's own class minus its video part. Where
torchvision imports, `AutoProcessor` must give the family's own class.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from workers.data import synth
from workers.data.records import load_jsonl
from workers.models.families import FAMILIES
from workers.models.lora import add_lora
from workers.models.model_dirs import LevelShape, build_level, build_tokenizer, load_model_dir, save_model_dir
from workers.models.prompts import record_units

pytestmark = pytest.mark.slow  # starts Ray or runs a pipeline: not in the fast tier (docs/setup.md)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_depth=1,
             vision_heads=2)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
TOLERANCE = 1e-5


def lora_student(base: Path, out: Path) -> Path:
    """A LoRA student of `base` as a LoRA stage saves it, its adapter moved off zero (a fresh adapter is the
    identity) so that loading it on the base changes the scores."""
    model, processor = load_model_dir(base)
    model = add_lora(model, LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return save_model_dir(model, processor, out)


@pytest.fixture(scope="module")
def interop(tmp_path_factory) -> dict:
    """The model dirs, the records, hkd's predictions of each dir and the subprocess's report."""
    tmp = tmp_path_factory.mktemp("interop")
    synth.generate(tmp / "data", seed=0, n_train=4, n_val=2, n_test=2)
    train = [r for t in synth.TASKS for r in load_jsonl(tmp / "data" / t / "train.jsonl")]
    records = [r for t in synth.TASKS for r in load_jsonl(tmp / "data" / t / "test.jsonl")]
    (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = build_tokenizer([u["text"] + u["answer"] for u in record_units(train)] + synth.sample_texts(50),
                          vocab_size=512)
    dirs = {f: build_level(tmp / f, LevelShape(family=f, **SHAPE), tok, image_size=56) for f in FAMILIES}
    dirs["lora"] = lora_student(dirs["qwen2_5_vl"], tmp / "lora")
    predictions = {}
    for name, model_dir in dirs.items():
        out = tmp / f"{name}.predictions.jsonl"
        assert main(["predict", str(model_dir), str(tmp / "records.jsonl"), "--out", str(out), "--no-shift"]) == 0
        predictions[name] = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    spec = {"docs": str(ROOT / "docs" / "interop.md"), "records": records,
            "cases": [{"dir": str(d), "base": str(dirs["qwen2_5_vl"]) if name == "lora" else None}
                      for name, d in dirs.items()]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "hf_interop_check.py"), str(tmp / "spec.json")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"dirs": dirs, "records": records, "predictions": predictions, "report": report,
            "results": {name: r for name, r in zip(dirs, report["results"])}}


def hkd_scores(row: dict) -> list[float]:
    return row["scores"] if "scores" in row else [row["score"]]


def hkd_decisions(row: dict) -> list[bool]:
    return row["hallucinated"] if "hallucinated" in row else [row["label"]]


def test_the_subprocess_imported_nothing_from_hkd(interop):
    assert interop["report"]["hkd_modules"] == []


@pytest.mark.parametrize("name", [*FAMILIES, "lora"])
def test_model_dir_loads_with_the_familys_own_classes(interop, name):
    family = FAMILIES["qwen2_5_vl" if name == "lora" else name]
    result = interop["results"][name]
    assert result["model_class"] == family.model_class.__name__
    assert result["processor_class"] == family.own.name  # what processor_config.json names
    assert result["video_processor_type"] == family.own.video
    if interop["report"]["torchvision"] or family.own.video is None:
        assert result["auto_processor"] == result["processor_used"] == family.own.name
    else:
        assert result["auto_processor"].startswith("ImportError") and "Torchvision" in result["auto_processor"]
        assert result["processor_used"] == "ImagesOnly"


@pytest.mark.parametrize("name", [*FAMILIES, "lora"])
def test_plain_forward_gives_hkd_predict_no_shift_scores(interop, name):
    result, rows = interop["results"][name], interop["predictions"][name]
    for record in interop["records"]:
        ours, plain = hkd_scores(rows[record["id"]]), result["scores"][record["id"]]
        n = len(record["options"]) if record["task"] == "hallucination" else 1
        assert len(ours) == len(plain) == n
        assert max(abs(a - b) for a, b in zip(ours, plain)) <= TOLERANCE, (record["id"], ours, plain)
        if name == "lora":
            assert max(abs(a - b) for a, b in zip(ours, result["peft_scores"][record["id"]])) <= TOLERANCE


@pytest.mark.parametrize("name", [*FAMILIES, "lora"])
def test_generate_first_label_word_is_hkd_predicts_decision(interop, name):
    result, rows = interop["results"][name], interop["predictions"][name]
    for record in interop["records"]:
        words = result["generated"][record["id"]]
        assert words == ["yes" if d else "no" for d in hkd_decisions(rows[record["id"]])], record["id"]


def test_lora_student_loads_with_peft_on_its_base_and_its_adapter_matters(interop):
    result = interop["results"]["lora"]
    assert result["peft_class"].startswith("PeftModel")
    base = interop["results"]["qwen2_5_vl"]["scores"]
    assert any(abs(a - b) > 1e-3 for rid in base for a, b in zip(base[rid], result["peft_scores"][rid]))


def test_hkd_reads_its_older_dirs_and_knows_a_family_by_either_processor_name(interop, tmp_path):
    """Dirs written before issue 32 name hkd's classes: hkd still loads them. A model of its own `model_type`
    (remote code) is known by its processor, under hkd's class name or the family's own."""
    from workers.models.families import family_of, load_processor
    from workers.models.families.qwen2_5_vl import HKDProcessor

    old = tmp_path / "old"
    shutil.copytree(interop["dirs"]["qwen2_5_vl"], old)
    for name in ("processor_config.json", "tokenizer_config.json"):
        saved = json.loads((old / name).read_text())
        (old / name).write_text(json.dumps({**saved, "processor_class": "HKDProcessor"}))
    assert type(load_processor(old)) is HKDProcessor
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "model_type": "my_vlm"}))
    for processor_class in ("HKDProcessor", "Qwen2_5_VLProcessor"):
        saved = json.loads((old / "processor_config.json").read_text())
        (old / "processor_config.json").write_text(json.dumps({**saved, "processor_class": processor_class}))
        assert family_of(old).name == "qwen2_5_vl"
