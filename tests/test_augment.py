"""Augmentation keeps every label true, keeps objects and hues intact, and is deterministic per key."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.data import synth
from workers.data.augment import AugmentConfig, augment_fingerprint, augment_record, vocabulary
from workers.data.records import load_jsonl

EPOCHS = range(4)
NONE = AugmentConfig(crop=False, flip=False, jitter=False, shuffle_options=False, paraphrase=False)


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("aug_synth")
    synth.generate(out, seed=5, n_train=30, n_val=1, n_test=1)
    return [r for task in synth.TASKS for r in load_jsonl(out / task / "train.jsonl")]


def _image(rec: dict) -> np.ndarray:
    return rec["image_array"] if "image_array" in rec else np.asarray(Image.open(rec["image"]).convert("RGB"))


def _centre(o: dict) -> tuple[int, int]:
    x0, y0, x1, y1 = o["bbox"]
    return int((y0 + y1) / 2), int((x0 + x1) / 2)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of chromatic [N, 3] pixels."""
    rgb = rgb.astype(np.float64)
    mx, mn = rgb.max(1), rgb.min(1)
    r, g, b = rgb.T
    d = mx - mn
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return 60.0 * h


def _name(sel: dict) -> str:
    return f"{sel['colour']} {sel['shape']}"


def test_every_augmentation_keeps_labels_true_in_the_transformed_scene(recs: list[dict]) -> None:
    mirrored = 0
    for rec in recs:
        for epoch in EPOCHS:
            aug = augment_record(rec, epoch, seed=0, cfg=AugmentConfig(flip_p=0.5))
            objs = aug["scene"]["objects"]
            mirrored += objs[0]["col"] != rec["scene"]["objects"][0]["col"]
            if aug["task"] == "hallucination":
                for option, hallucinated, fact in zip(aug["options"], aug["hallucinated"], aug["facts"]):
                    assert synth.holds(fact, objs) != hallucinated
                    if fact["kind"] == "relation":  # text says what the (mirrored) fact says
                        assert option == f"{_name(fact['a'])} {fact['rel']} {_name(fact['b'])}"
            else:
                ctx, claim = aug["facts"]["context"], aug["facts"]["claim"]
                assert synth.holds(claim, synth.apply_context(ctx, objs)) == aug["label"]
                if claim["kind"] == "relation":
                    assert claim["rel"] in aug["claim"]
                if ctx["kind"] == "move" and ctx["dcol"]:
                    assert ("to the left" if ctx["dcol"] < 0 else "to the right") in aug["context"]
    assert mirrored > len(recs)  # flips happened, so the mirrored facts were really exercised


def test_flip_equals_render_of_the_mirrored_scene(recs: list[dict]) -> None:
    cfg = replace(NONE, flip=True, flip_p=1.0)
    for rec in recs[:20]:
        aug = augment_record(rec, 0, seed=0, cfg=cfg)
        img = aug["image_array"]
        assert np.array_equal(img, _image(rec)[:, ::-1])
        assert (np.asarray(synth.render(aug["scene"])) == img).all(axis=2).mean() > 0.98
        for o in aug["scene"]["objects"]:
            assert tuple(img[_centre(o)]) == synth.PALETTE[o["colour"]]


def _interior(scene: dict, o: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of one object whose 8 neighbours are the object too (rows, cols)."""
    m = np.asarray(synth.render({**scene, "objects": [o], "background": [0, 0, 0]})).max(axis=2) > 0
    core = m.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core &= np.roll(m, (dy, dx), axis=(0, 1))
    return np.nonzero(core)


def test_crop_keeps_every_object_in_frame(recs: list[dict]) -> None:
    cfg = replace(NONE, crop=True, crop_scale=0.3)
    changed = 0
    for rec in recs:
        for epoch in EPOCHS:
            aug = augment_record(rec, epoch, seed=1, cfg=cfg)
            img, size = aug["image_array"], aug["scene"]["image_size"]
            assert img.shape == _image(rec).shape
            changed += not np.array_equal(img, _image(rec))
            for o, new in zip(rec["scene"]["objects"], aug["scene"]["objects"]):
                (x0, y0, x1, y1), (u0, v0, u1, v1) = o["bbox"], new["bbox"]
                assert 0 <= u0 < u1 <= size and 0 <= v0 < v1 <= size
                # Every interior pixel of the object, mapped by its bbox's zoom, keeps its exact colour.
                ys, xs = _interior(rec["scene"], o)
                cols = np.rint(u0 + (xs + 0.5 - x0) * (u1 - u0) / (x1 - x0) - 0.5).astype(int)
                rows = np.rint(v0 + (ys + 0.5 - y0) * (v1 - v0) / (y1 - y0) - 0.5).astype(int)
                assert len(xs) > 0 and cols.min() >= 0 and rows.min() >= 0
                assert (img[rows, cols] == synth.PALETTE[o["colour"]]).all()
    assert changed > len(recs) * 2


def test_jitter_never_changes_hue(recs: list[dict]) -> None:
    cfg = replace(NONE, jitter=True, brightness=0.5, contrast=0.5)  # strong: would clip without the safeguard
    strong = 0
    for rec in recs:
        orig = _image(rec)
        mask = np.ptp(orig, axis=2) >= 16  # colour-bearing = object pixels
        for epoch in EPOCHS:
            img = augment_record(rec, epoch, seed=2, cfg=cfg)["image_array"]
            before, after = orig[mask].astype(int), img[mask].astype(int)
            strong += np.abs(after - before).max() >= 40
            assert np.array_equal(before.argmax(1), after.argmax(1))
            assert np.array_equal(before[:, 1] == before[:, 2], after[:, 1] == after[:, 2])  # cyan ties stay
            assert (np.ptp(after, axis=1) >= 0.2 * np.ptp(before, axis=1)).all()  # no colour washed out
            diff = np.abs(_hue(before) - _hue(after))
            assert np.minimum(diff, 360 - diff).max() < 3.0
    assert strong > len(recs)


def test_option_shuffle_permutes_labels_facts_and_sentences_together(recs: list[dict]) -> None:
    moved = 0
    for rec in (r for r in recs if r["task"] == "hallucination"):
        aug = augment_record(rec, 3, seed=0, cfg=replace(NONE, shuffle_options=True))

        def rows(r: dict) -> Counter:
            return Counter(zip(r["options"], r["hallucinated"], map(json.dumps, r["facts"])))

        assert rows(aug) == rows(rec)
        moved += aug["options"] != rec["options"]
        sentences = re.split(r"(?<=\.) ", aug["caption"])
        assert sorted(sentences) == sorted(re.split(r"(?<=\.) ", rec["caption"]))
        for option, sentence, fact in zip(aug["options"], sentences, aug["facts"]):
            if fact["kind"] != "relation":  # relation options are not verbatim caption substrings
                assert option.lower() in sentence.lower()
    assert moved > 5


def test_shuffled_options_keep_their_labels_in_the_record_prompt(recs: list[dict]) -> None:
    """One forward per record: the k-th option span of the prompt is supervised with the k-th target, and that
    target is the label the original record gave that option, whatever order augmentation chose."""
    from workers.models.prompts import OPTION_CLOSE, OPTION_OPEN, record_units

    moved = 0
    for rec in (r for r in recs if r["task"] == "hallucination"):
        label_of = dict(zip(rec["options"], rec["hallucinated"]))
        if len(label_of) != len(rec["options"]):
            continue  # a repeated option text: its label cannot be looked up by text
        aug = augment_record(rec, 2, seed=1, cfg=replace(NONE, shuffle_options=True))
        (unit,) = record_units([{**aug, "image": aug["source_image"]}])
        spans = re.findall(re.escape(OPTION_OPEN) + "(.*?)" + re.escape(OPTION_CLOSE), unit["answer"])
        assert spans == aug["options"]
        assert unit["targets"] == [int(label_of[o]) for o in spans]
        moved += spans != rec["options"]
    assert moved > 5


_CONTENT = set(synth.PALETTE) | set(synth.PLURALS) | set(synth.SIZES) | set(synth.NAMES) | set(synth.NUMBER_WORDS)


def _content(text: str) -> Counter:
    """Meaning-bearing words, singular, 'zero' read as 'no', 'at least one X' as 'a X', relation words kept."""
    singular = {v: k for k, v in synth.PLURALS.items()} | {n + "s": n for n in synth.NAMES} | {"objects": "object"}
    text = text.lower().replace("at least one", "a")
    words = [singular.get(w, "no" if w == "zero" else w) for w in re.findall(r"[a-z]+", text)]
    return Counter(w for w in words if w in _CONTENT | {"left", "right", "above", "below", "object"})


def test_paraphrase_keeps_meaning_and_varies(recs: list[dict]) -> None:
    known = {w.lower() for w in synth.vocabulary() + vocabulary()}
    cfg = replace(NONE, paraphrase=True)
    variants: dict[str, set[str]] = {}
    for rec in recs:
        fields = ("caption",) if rec["task"] == "hallucination" else ("context", "claim")
        for epoch in range(6):
            aug = augment_record(rec, epoch, seed=0, cfg=cfg)
            added = ("aug_key", "image_array", "source_image")
            assert {k: v for k, v in aug.items() if k not in fields + added} == \
                {k: v for k, v in rec.items() if k not in fields + ("image",)}  # labels, facts, scene untouched
            for f in fields:
                assert _content(aug[f]) == _content(rec[f]), (rec[f], aug[f])
                assert set(re.findall(r"[a-z]+", aug[f].lower())) <= known
                variants.setdefault(rec[f], set()).add(aug[f])
            for option in aug.get("options", []):
                assert (option.lower() in aug["caption"].lower()) == (option.lower() in rec["caption"].lower())
            if "context" in fields and aug["claim"] != rec["claim"]:
                assert "image" not in aug["claim"] and "picture" not in aug["claim"]  # claims describe the world
    assert sum(len(v) > 1 for v in variants.values()) > len(variants) // 2


def test_same_key_same_bytes_other_epoch_differs(recs: list[dict], tmp_path: Path) -> None:
    cfg = AugmentConfig()
    for rec in recs[::7]:
        before = copy.deepcopy(rec)
        a = augment_record(rec, 1, seed=4, cfg=cfg, out_dir=tmp_path / "a")
        b = augment_record(rec, 1, seed=4, cfg=cfg, out_dir=tmp_path / "b")
        mem = augment_record(rec, 1, seed=4, cfg=cfg)
        other = augment_record(rec, 2, seed=4, cfg=cfg)
        assert rec == before  # input untouched
        assert Path(a["image"]).name == f"{a['aug_key']}.png"
        assert Path(a["image"]).read_bytes() == Path(b["image"]).read_bytes()
        assert {**a, "image": None} == {**b, "image": None}
        assert np.array_equal(mem["image_array"], _image(a)) and mem["aug_key"] == a["aug_key"]
        assert other["aug_key"] != a["aug_key"]
        assert not np.array_equal(other["image_array"], mem["image_array"])
    assert augment_fingerprint(cfg) == augment_fingerprint(AugmentConfig())
    assert augment_fingerprint(replace(cfg, flip_p=0.3)) != augment_fingerprint(cfg)
    assert augment_record(recs[0], 1, 4, replace(cfg, flip_p=0.3))["aug_key"] != \
        augment_record(recs[0], 1, 4, cfg)["aug_key"]


def test_augmented_files_pass_the_data_contract(recs: list[dict], tmp_path: Path) -> None:
    out = [augment_record(r, 0, seed=0, out_dir=tmp_path / "img") for r in recs]
    path = tmp_path / "aug.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    assert [r["aug_key"] for r in load_jsonl(path)] == [r["aug_key"] for r in out]


def _outside(tmp_path: Path, **fields: object) -> dict:
    yy, xx = np.mgrid[0:40, 0:60]
    img = np.stack([xx * 4, yy * 6, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    return {"id": "ext-1", "image": str(tmp_path / "photo.png"), **fields}


def test_records_without_scene(tmp_path: Path) -> None:
    flip = replace(NONE, flip=True, flip_p=1.0)
    rec = _outside(tmp_path, task="hallucination", caption="A dog sits on the left. The cat is left of the dog.",
                   options=["dog", "cat left of the dog", "a sofa"], hallucinated=[False, False, True])
    aug = augment_record(rec, 0, seed=0, cfg=flip)
    assert aug["caption"] == "A dog sits on the right. The cat is right of the dog."
    assert aug["options"] == ["dog", "cat right of the dog", "a sofa"]
    assert np.array_equal(aug["image_array"], _image(rec)[:, ::-1])

    hand = _outside(tmp_path, task="factuality", context="There are 50 states.", claim="He holds it in his right hand.")
    aug = augment_record(hand, 0, seed=0, cfg=flip)  # "right hand" has no mirror reading: no flip
    assert (aug["context"], aug["claim"]) == (hand["context"], hand["claim"])
    assert np.array_equal(aug["image_array"], _image(hand))

    unlabelled = _outside(tmp_path, task="hallucination", caption="There is a dog. There is a red circle.",
                          options=["dog", "red circle"])
    for epoch in EPOCHS:
        aug = augment_record(unlabelled, epoch, seed=0, cfg=AugmentConfig(flip_p=1.0))
        assert aug["image_array"].shape == (40, 60, 3) and "hallucinated" not in aug
        assert aug["caption"].startswith("There is a dog.")  # unknown text passes through
        full = augment_record(hand, epoch, seed=0, cfg=AugmentConfig())
        assert (full["context"], full["claim"]) == (hand["context"], hand["claim"])
