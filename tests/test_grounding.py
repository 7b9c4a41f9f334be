"""Grounding pre-training: the dense scene description, its encoding, and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.config.schema import RunConfig
from orchestrator.run.kinds import plan_stages
from workers.training import grounding
from workers.data import synth
from workers.models.model_dirs import load_model_dir


def test_description_names_every_object_in_reading_order():
    scenes = synth.random_scenes(3, 5)
    assert scenes == synth.random_scenes(3, 5) and scenes != synth.random_scenes(4, 5)
    for scene in scenes:
        text = synth.describe(scene)
        objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
        parts = text.split(".")[:-1]
        assert len(parts) == len(objs)
        for part, o in zip(parts, objs):
            assert f"{o['size']} {o['colour']} {o['shape']}" in part
            assert f"row {synth.NUMBER_WORDS[o['row'] + 1]} column {synth.NUMBER_WORDS[o['col'] + 1]}" in part


def test_labels_cover_exactly_the_description(tiny_model_dir):
    model, processor = load_model_dir(tiny_model_dir)
    scenes = synth.random_scenes(0, 3)
    enc = grounding.encode_scenes(scenes, processor)
    tok = processor.tokenizer
    for ids, labels, scene in zip(enc["input_ids"], enc["labels"], scenes):
        supervised = labels[labels != grounding.IGNORE]
        assert (ids[labels != grounding.IGNORE] == supervised).all()
        assert tok.decode(supervised) == synth.describe(scene) + tok.eos_token
        assert (ids[labels == grounding.IGNORE] == model.config.image_token_id).sum() == 16  # the image is prompt


def test_loss_is_next_token_cross_entropy_and_learns(tiny_model_dir):
    torch.manual_seed(0)
    model, processor = load_model_dir(tiny_model_dir)
    batch = grounding.collate(grounding.encode_scenes(synth.random_scenes(1, 4), processor),
                              processor.tokenizer.pad_token_id, model.config.image_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    manual = [F.cross_entropy(logits[i, t - 1], batch["labels"][i, t], reduction="sum")
              for i in range(4) for t in range(1, logits.shape[1]) if batch["labels"][i, t] != grounding.IGNORE]
    expected = torch.stack(manual).sum() / len(manual)
    first = grounding.grounding_loss(model, batch)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = grounding.grounding_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert grounding.grounding_loss(model, batch).item() < 0.7 * first.item()


def test_grounding_stages_come_first_and_initialise_the_levels():
    tiny = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_hidden": 32,
            "vision_depth": 1, "vision_heads": 2}
    cfg = RunConfig(levels={"L": tiny, "M": tiny, "S": tiny, "X": {"path": "/models/real"}},
                    pretrain={"enabled": True, "steps": 5},
                    direct={"levels": ["L", "S", "X"]},
                    ppod={"enabled": True, "stages": [{"student": "M", "teachers": [{"level": "L"}]}]})
    plans = {p.name: p for p in plan_stages(cfg)}
    assert list(plans)[:3] == ["L-grounding", "M-grounding", "S-grounding"]  # X is a real, pretrained model
    assert plans["L-direct"].init == "L-grounding" and plans["X-direct"].init is None
    assert plans["M+PPOD"].init == "M-grounding"
    off = RunConfig(**{**cfg.model_dump(), "pretrain": {"enabled": False}})
    assert not any(p.kind.name == "grounding" for p in plan_stages(off))
