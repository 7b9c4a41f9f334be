"""Tests for the procedural benchmark generator: determinism, balance, contract, label truth."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from workers.data import synth
from workers.data.synth import GENERATOR_VERSION, SynthSpec, apply_context, generate, holds, sample_texts

N = 200  # scenes per split: enough for the 45-55 % balance check to mean something, still ~2 s


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(out, seed=3, n_train=N, n_val=N // 2, n_test=N // 2)


def _records(out: Path, task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / task / f"{split}.jsonl").read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kw = {"n_train": 40, "n_val": 10, "n_test": 10}
    generate(tmp_path / "a", seed=7, **kw)
    generate(tmp_path / "b", seed=7, **kw)
    generate(tmp_path / "c", seed=8, **kw)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    for task in synth.TASKS:
        assert a[f"{task}/train.jsonl"] != c[f"{task}/train.jsonl"]
        assert a[f"{task}/images/train_000000.png"] != c[f"{task}/images/train_000000.png"]


@pytest.mark.parametrize("split", synth.SPLITS)
def test_class_balance(data: tuple[Path, dict], split: str) -> None:
    out, meta = data
    h = [flag for r in _records(out, "hallucination", split) for flag in r["hallucinated"]]
    f = [r["label"] for r in _records(out, "factuality", split)]
    for task, labels in (("hallucination", h), ("factuality", f)):
        share = sum(labels) / len(labels)
        assert 0.45 <= share <= 0.55, (task, split, share)
        assert meta["class_balance"][task][split] == pytest.approx(share)


@pytest.mark.parametrize("task", synth.TASKS)
def test_records_follow_contract(data: tuple[Path, dict], task: str) -> None:
    out, _ = data
    lo, hi = SynthSpec().options_per_scene
    for split in synth.SPLITS:
        recs = _records(out, task, split)
        assert len(recs) == (N if split == "train" else N // 2)
        ids = [r["id"] for r in recs]
        assert len(set(ids)) == len(ids) and all(i.startswith(f"{task[0]}-{split}-") for i in ids)
        for r in recs:
            assert r["task"] == task and isinstance(r["image"], str) and not Path(r["image"]).is_absolute()
            assert isinstance(r["scene"]["objects"], list) and 1 <= len(r["scene"]["objects"]) <= 5
            if task == "hallucination":
                assert isinstance(r["caption"], str) and r["caption"]
                assert lo <= len(r["options"]) <= hi and len(r["options"]) == len(r["hallucinated"])
                assert len(set(r["options"])) == len(r["options"])
                assert all(isinstance(o, str) for o in r["options"])
                assert all(isinstance(x, bool) for x in r["hallucinated"])
            else:
                assert isinstance(r["context"], str) and isinstance(r["claim"], str)
                assert isinstance(r["label"], bool)
        for r in recs[:5]:
            with Image.open(out / task / r["image"]) as im:
                assert im.mode == "RGB" and im.size == (112, 112)


# ---- label truth, recomputed from the scene by an evaluator independent of the generator's
SHAPE_OF = {**{s: s for s in synth.PLURALS}, **{p: s for s, p in synth.PLURALS.items()}}
NUM = {w: i for i, w in enumerate(synth.NUMBER_WORDS)}
REL = {"left of": lambda a, b: a["col"] < b["col"], "right of": lambda a, b: a["col"] > b["col"],
       "above": lambda a, b: a["row"] < b["row"], "below": lambda a, b: a["row"] > b["row"]}


def _np(phrase: str, names: dict[str, dict]) -> dict:
    """Noun phrase -> attribute constraints: 'red circle', 'zib(s)', 'circles', 'red objects'."""
    words = [w for w in phrase.split() if w not in ("a", "the")]
    sel: dict = {}
    for w in words:
        if w in SHAPE_OF:
            sel["shape"] = SHAPE_OF[w]
        elif w in synth.PALETTE:
            sel["colour"] = w
        elif w.rstrip("s") in names:
            sel.update(names[w.rstrip("s")])
        else:
            assert w in ("object", "objects"), phrase
    return sel


def _sel(objs: list[dict], sel: dict) -> list[dict]:
    return [o for o in objs if all(o[k] == v for k, v in sel.items())]


def _truth(text: str, objs: list[dict], names: dict[str, dict]) -> bool:
    text = text.rstrip(".")
    if m := re.fullmatch(r"(?:[Tt]he|A) (.+?) is (left of|right of|above|below) (?:the|a) (.+)", text) or \
            re.fullmatch(r"(\w+ \w+) (left of|right of|above|below) (\w+ \w+)", text):
        a, b = _sel(objs, _np(m[1], names)), _sel(objs, _np(m[3], names))
        return any(x is not y and REL[m[2]](x, y) for x in a for y in b)
    if m := re.fullmatch(r"(?:There (?:is|are) )?(\w+) (\w+ ?\w*)", text):
        if m[1] in NUM:
            return len(_sel(objs, _np(m[2], names))) == NUM[m[1]]
    if m := re.fullmatch(r"(?:[Tt]he|A) (.+?) is (?:a )?(\w+)", text):
        extra = _np(m[2], names) if m[2] not in synth.SIZES else {"size": m[2]}
        return bool(_sel(objs, {**_np(m[1], names), **extra}))
    m = re.fullmatch(r"(?:There is a )?(\w+ \w+)", text)
    assert m, text
    return bool(_sel(objs, _np(m[1], names)))


def _world(context: str, objs: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Apply a context sentence to the scene: returns the objects after it and the names it defines."""
    if m := re.fullmatch(r"In this game, every (\w+)(?: object)? is called a (\w+)\.", context):
        key = "colour" if m[1] in synth.PALETTE else "shape"
        return objs, {m[2]: {key: m[1]}}
    m = re.fullmatch(r"The (\w+) (\w+) was (painted (\w+)|removed|moved one cell (.+)) after the photo was taken\.",
                     context)
    assert m, context
    out = []
    for o in objs:
        if (o["colour"], o["shape"]) != (m[1], m[2]):
            out.append(o)
        elif m[4]:
            out.append({**o, "colour": m[4]})
        elif m[5]:
            dr, dc = synth.MOVES[m[5]]
            out.append({**o, "row": o["row"] + dr, "col": o["col"] + dc})
    return out, {}


def test_hallucination_labels_true_to_scene(data: tuple[Path, dict]) -> None:
    out, _ = data
    seen_types = set()
    for r in _records(out, "hallucination", "train"):
        objs = r["scene"]["objects"]
        cells = [(o["row"], o["col"]) for o in objs]
        assert len(set(cells)) == len(cells)
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:  # drawn inside its own 28-px cell
            x0, y0, x1, y1 = o["bbox"]
            assert o["col"] * 28 <= x0 < x1 <= (o["col"] + 1) * 28 and o["row"] * 28 <= y0 < y1 <= (o["row"] + 1) * 28
        for option, flag, fact in zip(r["options"], r["hallucinated"], r["facts"]):
            assert _truth(option, objs, {}) != flag, (option, flag, objs)
            assert holds(fact, objs) != flag
            seen_types.add(fact["type"])
        sentences = [s + "." for s in r["caption"].split(". ") if s]
        assert [_truth(s, objs, {}) for s in sentences] == [not f for f in r["hallucinated"]]
    assert seen_types == {"true", *synth.HALLUCINATION_TYPES}


def test_factuality_labels_true_to_scene(data: tuple[Path, dict]) -> None:
    out, _ = data
    seen = set()
    for r in _records(out, "factuality", "train"):
        objs = r["scene"]["objects"]
        world, names = _world(r["context"], objs)
        assert _truth(r["claim"], world, names) == r["label"], (r["context"], r["claim"], r["label"], objs)
        facts = r["facts"]
        assert holds(facts["claim"], apply_context(facts["context"], objs)) == r["label"]
        seen.add((facts["type"], r["label"]))
    assert seen == {(t, lab) for t in synth.CLAIM_TYPES for lab in (True, False)}


def test_meta(data: tuple[Path, dict]) -> None:
    out, meta = data
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["generator_version"] == GENERATOR_VERSION and meta["seed"] == 3
    assert meta["counts"] == {t: {"train": N, "val": N // 2, "test": N // 2} for t in synth.TASKS}
    assert meta["options"]["train"] == sum(len(r["options"]) for r in _records(out, "hallucination", "train"))
    assert meta["spec"] == json.loads(json.dumps(asdict(SynthSpec())))
    assert set(meta["class_balance"]) == set(synth.TASKS)


def test_sample_texts_cover_generated_words(data: tuple[Path, dict]) -> None:
    out, _ = data
    texts = sample_texts(20, seed=1)
    assert texts == sample_texts(20, seed=1) and all(isinstance(t, str) and t for t in texts)
    vocab = set(re.findall(r"\w+|[^\w\s]", " ".join(texts)))
    emitted = set()
    for r in _records(out, "hallucination", "train"):
        emitted.update(re.findall(r"\w+|[^\w\s]", " ".join([r["caption"], *r["options"]])))
    for r in _records(out, "factuality", "train"):
        emitted.update(re.findall(r"\w+|[^\w\s]", r["context"] + " " + r["claim"]))
    assert emitted <= vocab, emitted - vocab


def test_custom_spec_and_validation(tmp_path: Path) -> None:
    spec = SynthSpec(image_size=56, max_objects=3, shapes=("circle", "diamond"), colours=("red", "white"),
                     claim_weights=(("move", 1.0),), hallucination_weights=(("size", 1.0),))
    meta = generate(tmp_path, seed=0, n_train=20, n_val=4, n_test=4, spec=spec)
    rec = _records(tmp_path, "factuality", "train")[0]
    assert rec["facts"]["type"] == "move"
    with Image.open(tmp_path / "factuality" / rec["image"]) as im:
        assert im.size == (56, 56)
    assert meta["spec"]["shapes"] == ["circle", "diamond"]
    with pytest.raises(ValueError):
        SynthSpec(max_objects=17)
    with pytest.raises(ValueError):
        SynthSpec(shapes=("circle", "hexagon"))


def test_claim_kinds_limit_what_claims_are_about() -> None:
    spec = SynthSpec(claim_weights=(("naming", 1.0), ("recolour", 1.0)), claim_kinds=("attr", "size"))
    import random
    kinds = {e["facts"]["kind"] for e in synth._examples("factuality", random.Random(0), 60, spec)}
    assert kinds <= {"attr", "size"} and "size" in kinds
    with pytest.raises(ValueError, match="claim_kinds"):
        SynthSpec(claim_weights=(("recolour", 1.0),), claim_kinds=("attr",))
