"""Model families (`workers.models.families`): tiny Qwen3-VL, Idefics3, SmolVLM, Gemma 3 and InternVL levels build offline,
load, encode, score and train a grounding batch as Qwen2.5-VL's do. Their Ray path (direct tuning, distillation with a
teacher actor, `hkd evaluate`, `hkd predict`) runs in one pyramid of all five, each level distilled from the one
above: `tests/test_cross_tokenizer.py`."""

from __future__ import annotations

import json
import shutil
import typing

import pytest
import torch

from orchestrator.cli import main
from workers.training import grounding
from workers.data import synth
from workers.data.records import load_jsonl
from workers.models.families import FAMILIES, family_of, load_processor
from workers.inference.logits import position_logits
from workers.models.model_dirs import LevelShape, build_level, build_tokenizer, load_model_dir
from workers.models.prompts import collate_records, encode_records, model_inputs, record_units, select_rows

SHAPE = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_depth=1,
             vision_heads=2)


def tiny(family: str) -> str:
    """A tiny level of `family` as the YAML flow mapping of a run config's `levels:`."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in {"family": family, **SHAPE}.items()) + "}"


TINY = tiny("qwen3_vl")
MODEL_CLASS = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
               "smolvlm": "SmolVLMForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
               "internvl": "InternVLForConditionalGeneration"}


def test_family_names_are_the_adapters():
    """`LevelShape.family` (torch-free, for config validation) lists exactly the adapters there are."""
    assert typing.get_args(typing.get_type_hints(LevelShape)["family"]) == tuple(FAMILIES)


@pytest.fixture(scope="module", params=list(MODEL_CLASS))
def level(request, tmp_path_factory):
    """A tiny level of each non-default family with the records it encodes: (family, model, processor, units)."""
    tmp = tmp_path_factory.mktemp(request.param)
    synth.generate(tmp / "data", seed=0, n_train=4, n_val=2, n_test=2)
    units = record_units([r for t in synth.TASKS for r in load_jsonl(tmp / "data" / t / "train.jsonl")])
    tok = build_tokenizer([u["text"] + u["answer"] for u in units] + synth.sample_texts(50), vocab_size=512)
    model_dir = build_level(tmp / "m", LevelShape(family=request.param, **SHAPE), tok, image_size=56)
    assert family_of(model_dir).name == request.param
    model, processor = load_model_dir(model_dir)
    assert type(model).__name__ == MODEL_CLASS[request.param]
    assert type(processor) is FAMILIES[request.param].processor_class is type(load_processor(model_dir))
    return request.param, model, processor, units


def _collate(enc: dict, processor, model) -> dict:
    return collate_records(enc, processor.tokenizer.pad_token_id, model.config.image_token_id)


def test_tiny_level_builds_loads_and_scores_each_option(level):
    family, model, processor, units = level
    batch = _collate(encode_records(units, processor), processor, model)
    assert len(batch["target"]) == sum(len(u["targets"]) for u in units)  # one position per option / claim
    logits = position_logits(model, batch)
    assert logits.shape == (len(batch["target"]), len(processor.tokenizer)) and torch.isfinite(logits).all()
    # Qwen3-VL: 16-pixel patches merged 2 x 2, a 56-pixel image resized to 64; Idefics3 and SmolVLM: 14-pixel
    # patches shuffled 2 x 2, 56 pixels as they are; Gemma 3: resized to its tower's 112 pixels, 8 x 8 patches of 14
    # pooled 4 x 4; InternVL: resized to its tower's 56 pixels, 4 x 4 patches of 14 shuffled 2 x 2. All give 4 image
    # tokens.
    assert (batch["input_ids"][0] == model.config.image_token_id).sum() == 4
    if family in ("idefics3", "smolvlm"):
        assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
        assert batch["pixel_values"].shape == (len(units), 1, 3, 56, 56) and batch["pixel_attention_mask"].all()
    if family == "gemma3":
        assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
        assert batch["pixel_values"].shape == (len(units), 3, 112, 112)
        assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == model.config.image_token_id)
    if family == "internvl":
        assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
        assert batch["pixel_values"].shape == (len(units), 3, 56, 56)
        assert batch["image_sizes"].tolist() == [[56, 56]] * len(units)


def test_select_rows_match_those_rows_collated_alone(level):
    """What a teacher resend sends for some rows equals those rows batched alone (pixels follow their rows,
    positions re-indexed; the padded width stays, so columns shift by the width difference)."""
    family, model, processor, units = level
    enc = encode_records(units, processor)
    batch, rows = _collate(enc, processor, model), [1, 2, len(units) - 1]
    part = select_rows(batch, rows)
    alone = _collate({k: v[rows] for k, v in enc.items()}, processor, model)
    shift = batch["input_ids"].shape[1] - alone["input_ids"].shape[1]
    per_token = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}
    for key in model_inputs(batch):
        assert torch.equal(part[key][:, shift:] if key in per_token else part[key], alone[key]), key
    assert torch.equal(part["positions"], alone["positions"] + torch.tensor([0, shift]))


def test_grounding_batches_of_each_family_train(level):
    """The grounding stage's scenes go through the family's image format too: a finite loss with a gradient."""
    family, model, processor, _ = level
    batch = grounding.collate(grounding.encode_scenes(synth.random_scenes(1, 2), processor),
                              processor.tokenizer.pad_token_id, model.config.image_token_id)
    loss = grounding.grounding_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_unknown_family_refused_with_key_path(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("levels: {S: {family: llava}}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "levels.S.family" in err and "qwen3_vl" in err


def test_model_dir_of_unsupported_family_refused_naming_the_level(tmp_path, capsys, tiny_model_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    for name, key, value in (("config.json", "model_type", "llava"), ("processor_config.json", "processor_class",
                                                                       "LlavaProcessor")):
        saved = json.loads((other / name).read_text())
        (other / name).write_text(json.dumps({**saved, key: value}))
    path = tmp_path / "c.yaml"
    path.write_text(f"levels: {{S: {{path: '{other}'}}}}\ndirect: {{levels: [S]}}\n"
                    "data: {source: synth, synth: {train: 4, val: 2, test: 2}}\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    assert (f"levels.S.path: {other}: model_type 'llava' is not a supported family (qwen2_5_vl, qwen3_vl, "
            "idefics3, smolvlm, gemma3, internvl)") in capsys.readouterr().err


def test_family_enters_the_stage_fingerprint_only_when_not_the_default(tmp_path):
    """A finished stage is not reused under another family; Qwen2.5-VL runs from before `family` keep theirs."""
    from orchestrator.config.schema import load_config
    from orchestrator.run.fingerprints import fingerprints
    from orchestrator.run.kinds import plan_stages

    prints = {}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        path = tmp_path / f"{family}.yaml"
        path.write_text(f"levels: {{S: {{family: {family}}}}}\ndirect: {{levels: [S]}}\n")
        cfg = load_config(path)
        prints[family] = fingerprints(cfg, plan_stages(cfg))["S-direct"]
    (tmp_path / "none.yaml").write_text("levels: {S: {}}\ndirect: {levels: [S]}\n")
    cfg = load_config(tmp_path / "none.yaml")
    assert fingerprints(cfg, plan_stages(cfg))["S-direct"] == prints["qwen2_5_vl"] != prints["qwen3_vl"]
