"""Diverse, label-preserving augmentation of benchmark records, deterministic per (id, epoch, seed).

Teacher and student must see the same augmented sample, and teacher answers are cached, so every
random choice comes from ``random.Random(f"{seed}/{epoch}/{id}")`` and the result carries an
``aug_key`` that names it. Each transform keeps every label true by construction:

* crop: a zoom that keeps every scene bbox in frame (without a scene: keeps >= 95 % of each side);
* flip: mirrors image, scene (columns, bboxes) and facts (relations, moves) and swaps spatial
  left/right phrases; skipped when the text uses left/right in any other way ("his right hand");
* jitter: one brightness/contrast affine map shared by all channels, weakened where needed so no
  coloured pixel clips: hue (and therefore every colour word) is unchanged;
* shuffle: permutes Task-1 options with their labels and facts (and synth caption sentences);
* paraphrase: template rewrites of synth sentences only (every word from the synth vocabulary);
  Task-2 claims describe the world *after* the context's change, so they are never rewritten to
  talk about "the image".

Images come back either as a PNG under ``out_dir`` named by ``aug_key`` (``image`` points to it;
written atomically, reused when present) or, with ``out_dir=None``, in memory as ``image_array``
(uint8 HxWx3) with ``image`` removed, so no consumer can silently read the un-augmented file; the
source path stays in ``source_image``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from workers.data import synth
from workers.data.records import load_rgb

AUGMENT_VERSION = "augment-1"  # bump when a transform changes, so cached teacher outputs go stale

_BLIND_CROP = 0.05  # largest share of a side a crop may drop when nothing says where objects are
_CROP_MARGIN = 2  # px kept around the union of scene bboxes (antialiased edges)
_CHROMA_MIN = 16  # max - min channel spread from which a pixel carries a colour word


@dataclass(frozen=True)
class AugmentConfig:
    """Which transforms run and how strong they are; part of every aug_key."""

    crop: bool = True
    crop_scale: float = dataclasses.field(default=0.15, metadata={"bounds": {"ge": 0, "lt": 1}})  # side from [1 - s, 1]
    flip: bool = True
    flip_p: float = dataclasses.field(default=0.5, metadata={"bounds": {"ge": 0, "le": 1}})
    jitter: bool = True
    brightness: float = dataclasses.field(default=0.2, metadata={"bounds": {"ge": 0, "lt": 1}})  # factor from [1 - b, 1 + b]
    contrast: float = dataclasses.field(default=0.2, metadata={"bounds": {"ge": 0, "lt": 1}})
    shuffle_options: bool = True
    paraphrase: bool = True

    def __post_init__(self) -> None:
        if not all(within(getattr(self, f.name), f.metadata.get("bounds", {})) for f in fields(self)):
            raise ValueError(f"invalid AugmentConfig: {self}")


def within(value: float, bounds: dict[str, float]) -> bool:
    """`value` inside pydantic-style bounds (`ge`, `gt`, `le`, `lt`), the ones `orchestrator.config.schema` enforces too."""
    checks = {"ge": value >= bounds.get("ge", value), "gt": "gt" not in bounds or value > bounds["gt"],
              "le": value <= bounds.get("le", value), "lt": "lt" not in bounds or value < bounds["lt"]}
    return all(checks.values())


def augment_fingerprint(cfg: AugmentConfig) -> str:
    """Stable hash of the config and the code version, for cache keys."""
    blob = json.dumps({"version": AUGMENT_VERSION, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def aug_key(record_id: str, epoch: int, seed: int, cfg: AugmentConfig) -> str:
    """Name of one augmented sample: equal keys mean identical records and images."""
    blob = json.dumps([record_id, epoch, seed, augment_fingerprint(cfg)])
    return hashlib.sha1(blob.encode()).hexdigest()


def augment_record(record: dict, epoch: int, seed: int, cfg: AugmentConfig = AugmentConfig(),
                   out_dir: str | Path | None = None) -> dict:
    """A new, augmented copy of a loaded record (the input is not mutated); see the module doc."""
    rng = random.Random(f"{seed}/{epoch}/{record['id']}")
    rec = copy.deepcopy(record)
    img = np.asarray(load_rgb(rec["image"]))
    scene = rec["scene"] if _is_scene(rec.get("scene")) else None
    if cfg.shuffle_options and rec.get("task") == "hallucination":
        _shuffle_options(rec, rng)
    if cfg.flip and rng.random() < cfg.flip_p and _flippable(rec):
        img = img[:, ::-1]
        _flip_text(rec)
        _mirror_facts(rec)
        if scene is not None:
            _mirror_scene(scene)
    if cfg.crop:
        img = _crop(img, rng, cfg.crop_scale, scene)
    if cfg.jitter:
        img = _jitter(img, rng, cfg.brightness, cfg.contrast)
    if cfg.paraphrase:
        _paraphrase_record(rec, rng)
    key = aug_key(record["id"], epoch, seed, cfg)
    rec["aug_key"] = key
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if out_dir is None:
        rec["source_image"] = rec.pop("image")
        rec["image_array"] = img
    else:
        rec["image"] = _write_png(img, Path(out_dir) / f"{key}.png")
    return rec


def vocabulary() -> list[str]:
    """Words paraphrases add to synth.vocabulary(): append to a tokenizer corpus built from synth text."""
    return sorted(_PARAPHRASE_WORDS.split())


# ---------------------------------------------------------------- scene and facts

def _is_scene(scene: Any) -> bool:
    """A synth scene this module can transform; anything else is treated as outside data."""
    return (isinstance(scene, dict) and {"image_size", "cell_px", "objects"} <= scene.keys()
            and all(isinstance(o, dict) and {"col", "bbox"} <= o.keys() for o in scene["objects"]))


def _mirror_scene(scene: dict) -> None:
    size, grid = scene["image_size"], scene["image_size"] // scene["cell_px"]
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["bbox"]
        o["bbox"] = [size - x1, y0, size - x0, y1]
        o["col"] = grid - 1 - o["col"]


def _mirror_fact(fact: Any) -> Any:
    """The fact about the mirrored scene: left/right relations swap, horizontal moves reverse."""
    if not isinstance(fact, dict):
        return fact
    if fact.get("kind") == "relation":
        return {**fact, "rel": _SWAP_REL.get(fact["rel"], fact["rel"])}
    if fact.get("kind") == "move":
        return {**fact, "dcol": -fact["dcol"]}
    return fact


def _mirror_facts(rec: dict) -> None:
    facts = rec.get("facts")
    if isinstance(facts, list):
        rec["facts"] = [_mirror_fact(f) for f in facts]
    elif isinstance(facts, dict):
        rec["facts"] = {k: _mirror_fact(v) for k, v in facts.items()}


_SWAP_REL = {"left of": "right of", "right of": "left of"}


# ---------------------------------------------------------------- shuffle

def _shuffle_options(rec: dict, rng: random.Random) -> None:
    """Permute options with every parallel list; synth captions (one sentence per option) follow."""
    n = len(rec["options"])
    perm = list(range(n))
    rng.shuffle(perm)
    for field in ("options", "hallucinated", "facts"):
        if isinstance(rec.get(field), list) and len(rec[field]) == n:
            rec[field] = [rec[field][i] for i in perm]
    sentences = _sentences(rec["caption"])
    if isinstance(rec.get("facts"), list) and len(sentences) == n:
        rec["caption"] = " ".join(sentences[i] for i in perm)


# ---------------------------------------------------------------- flip text

_TEXT_FIELDS = ("caption", "context", "claim")
_SIDE_WORD = re.compile(r"\b(?:left|right)", re.IGNORECASE)  # also catches "rightmost", "right-hand"
_SIDE_PHRASE = re.compile(r"\b(?:(?:to|on|at) the (left|right)\b|(left|right) of\b)", re.IGNORECASE)


def _texts(rec: dict) -> list[str]:
    return [rec[f] for f in _TEXT_FIELDS if isinstance(rec.get(f), str)] + list(rec.get("options") or [])


def _flippable(rec: dict) -> bool:
    """Flip only when every left/right word sits in a spatial phrase that swapping keeps true."""
    return all(len(_SIDE_WORD.findall(t)) == len(_SIDE_PHRASE.findall(t)) for t in _texts(rec))


def _swap_sides(text: str) -> str:
    def swap(m: re.Match) -> str:
        group = 1 if m.group(1) else 2
        word = m.group(group)
        new = {"left": "right", "right": "left"}[word.lower()]
        new = new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new
        start, end = m.span(group)
        return m.group(0)[:start - m.start()] + new + m.group(0)[end - m.start():]

    return _SIDE_PHRASE.sub(swap, text)


def _flip_text(rec: dict) -> None:
    for f in _TEXT_FIELDS:
        if isinstance(rec.get(f), str):
            rec[f] = _swap_sides(rec[f])
    if rec.get("options") is not None:
        rec["options"] = [_swap_sides(o) for o in rec["options"]]


# ---------------------------------------------------------------- image

def _crop(img: np.ndarray, rng: random.Random, scale: float, scene: dict | None) -> np.ndarray:
    """Random zoom with the input's size and aspect ratio that keeps every scene bbox in frame;
    scene bboxes are mapped to the new image."""
    h, w = img.shape[:2]
    boxes = [o["bbox"] for o in scene["objects"]] if scene and scene["objects"] else None
    s = rng.uniform(1.0 - (scale if boxes else min(scale, _BLIND_CROP)), 1.0)
    cw, ch = max(1, round(s * w)), max(1, round(s * h))
    if boxes:
        kx, ky = w / scene["image_size"], h / scene["image_size"]
        ux0 = max(0, int(min(b[0] for b in boxes) * kx) - _CROP_MARGIN)
        uy0 = max(0, int(min(b[1] for b in boxes) * ky) - _CROP_MARGIN)
        ux1 = min(w, int(np.ceil(max(b[2] for b in boxes) * kx)) + _CROP_MARGIN)
        uy1 = min(h, int(np.ceil(max(b[3] for b in boxes) * ky)) + _CROP_MARGIN)
        cw, ch = max(cw, ux1 - ux0), max(ch, uy1 - uy0)
        left, top = rng.randint(max(0, ux1 - cw), min(ux0, w - cw)), rng.randint(max(0, uy1 - ch), min(uy0, h - ch))
        sx, sy = w / cw / kx, h / ch / ky  # scene units -> scene units of the zoomed image
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            o["bbox"] = [round((x0 * kx - left) * sx, 2), round((y0 * ky - top) * sy, 2),
                         round((x1 * kx - left) * sx, 2), round((y1 * ky - top) * sy, 2)]
    else:
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = Image.fromarray(np.ascontiguousarray(img)).crop((left, top, left + cw, top + ch))
    return np.asarray(out.resize((w, h), Image.BILINEAR))


def _jitter(img: np.ndarray, rng: random.Random, brightness: float, contrast: float) -> np.ndarray:
    """Brightness/contrast as one affine map a·x + b on all channels, which keeps hue; the map is
    pulled towards identity just enough that no colour-bearing pixel clips (clipping one channel
    shifts hue, saturating all of them turns yellow into white), so only greys meet the clamp."""
    bf = rng.uniform(1.0 - brightness, 1.0 + brightness)
    cf = rng.uniform(1.0 - contrast, 1.0 + contrast)
    x = img.astype(np.float32)
    a, b = bf * cf, bf * (1.0 - cf) * float(x.mean())
    coloured = x[np.ptp(x, axis=2) >= _CHROMA_MIN]
    t = 1.0
    if coloured.size:
        for v in (float(coloured.max()), float(coloured.min())):
            d = (a - 1.0) * v + b  # x + t·d is where v lands at strength t
            if v + d > 255.0:
                t = min(t, (255.0 - v) / d)
            elif v + d < 0.0:
                t = min(t, v / -d)
    y = x + t * ((a - 1.0) * x + b)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _write_png(img: np.ndarray, path: Path) -> str:
    """Write once, atomically: same key means same bytes, so an existing file is reused."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(img).save(fh, format="PNG", compress_level=1)
        os.replace(tmp, path)
    return str(path.resolve())


# ---------------------------------------------------------------- paraphrase

_PARAPHRASE_WORDS = "image shows picture named number zero At least After"
_KNOWN_WORDS = {w.lower() for w in synth.vocabulary() + _PARAPHRASE_WORDS.split()}
_NUMBERS = "|".join(synth.NUMBER_WORDS + ("zero",))
_NAMES = "|".join(synth.NAMES)
_PLURAL = {"object": "objects", **synth.PLURALS, **{n: n + "s" for n in synth.NAMES}}
_SINGULAR = {v: k for k, v in _PLURAL.items()}

Rule = tuple[re.Pattern, Callable[[re.Match], list[str]]]


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text)


def _be(np_: str) -> str:
    return "is" if np_.split()[0] in ("a", "an", "one") else "are"


def _exist_forms(m: re.Match) -> list[str]:
    np_ = m["np"]
    return [f"There {_be(np_)} {np_}.", f"The image shows {np_}.", f"In the image there {_be(np_)} {np_}."]


def _noun_for(n: str, noun: str) -> str:
    *head, last = noun.split()
    last = _PLURAL.get(last, last) if n != "one" else _SINGULAR.get(last, last)
    return " ".join([*head, last])


def _count_forms(m: re.Match) -> list[str]:
    n = "no" if (m["n1"] or m["n2"]) == "zero" else (m["n1"] or m["n2"])
    noun = m["noun1"] or m["noun2"]
    return [f"There {'is' if n == 'one' else 'are'} {n} {_noun_for(n, noun)}.",
            f"The number of {_noun_for('two', noun)} is {'zero' if n == 'no' else n}."]


# Whole-sentence rules per field; each lists every equivalent form (the original among them).
_CAPTION_RULES: list[Rule] = [
    (re.compile(r"^(?:There (?:is|are)|The image shows|In the image there (?:is|are)) (?P<np>[^.,]+)\.$"),
     _exist_forms),
    (re.compile(r"^(?:The|In the image, the) (?P<rest>[^.,]+)\.$"),
     lambda m: [f"The {m['rest']}.", f"In the image, the {m['rest']}."]),
]
_CONTEXT_RULES: list[Rule] = [
    (re.compile(r"^In this game, every (?P<x>[a-z ]+) is (?:called|named) (?P<name>an? \w+)\.$"),
     lambda m: [f"In this game, every {m['x']} is {verb} {m['name']}." for verb in ("called", "named")]),
    (re.compile(r"^(?:The (?P<s1>[^,.]+) after the (?:photo|picture) was taken"
                r"|After the (?:photo|picture) was taken, the (?P<s2>[^,.]+))\.$"),
     lambda m: [form.format(s=m["s1"] or m["s2"], noun=noun) for noun in ("photo", "picture")
                for form in ("The {s} after the {noun} was taken.", "After the {noun} was taken, the {s}.")]),
]
_CLAIM_RULES: list[Rule] = [
    (re.compile(rf"^(?:There (?:is|are) (?P<n1>{_NUMBERS}) (?P<noun1>[a-z ]+)"
                rf"|The number of (?P<noun2>[a-z ]+) is (?P<n2>{_NUMBERS}))\.$"), _count_forms),
    (re.compile(rf"^(?:A|At least one) (?P<name>{_NAMES}) is (?P<rest>[^.,]+)\.$"),
     lambda m: [f"A {m['name']} is {m['rest']}.", f"At least one {m['name']} is {m['rest']}."]),
]
_REL_PHRASE = re.compile(r"\bis (?:to the )?(left|right) of\b")


def _paraphrase(text: str, rules: list[Rule], rng: random.Random) -> str:
    """Rewrite each sentence made only of synth words; anything else passes through unchanged."""
    out = []
    for sentence in _sentences(text):
        if {w.lower() for w in re.findall(r"[A-Za-z]+", sentence)} <= _KNOWN_WORDS:
            for pattern, forms in rules:
                if m := pattern.match(sentence):
                    sentence = rng.choice(forms(m))
                    break
            sentence = _REL_PHRASE.sub(lambda m: rng.choice((f"is {m[1]} of", f"is to the {m[1]} of")), sentence)
        out.append(sentence)
    return " ".join(out)


def _paraphrase_record(rec: dict, rng: random.Random) -> None:
    """Captions describe the image; contexts and claims describe the world and keep that reading."""
    for field, rules in (("caption", _CAPTION_RULES), ("context", _CONTEXT_RULES), ("claim", _CLAIM_RULES)):
        if isinstance(rec.get(field), str):
            rec[field] = _paraphrase(rec[field], rules, rng)
