"""Deterministic procedural benchmark for multimodal hallucination detection and factuality.

Scenes of a few coloured shapes sit on a grid whose cells match the receptive field of one
merged vision token (28 px for Qwen2.5-VL), so a small randomly initialised VLM can learn
the benchmark from scratch. Two tasks are written as JSONL + PNG:

* ``hallucination``: a template caption, the phrases it mentions (``options``) and whether
  each phrase is unsupported by the image (``hallucinated``).
* ``factuality``: a context text and a claim that needs both image and context (naming rules
  or a change made after the photo), labelled true when the claim is factual.

Every record also carries ``scene`` (objects with shape, colour, size, grid cell, bbox) and
``facts`` (a structured form of each option / of the context and claim) so later code can
recompute labels after augmentation with :func:`holds` and :func:`apply_context`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

GENERATOR_VERSION = "synth-1.0"

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 40),
    "purple": (170, 70, 220),
    "cyan": (40, 220, 220),
    "white": (240, 240, 240),
}
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
NAMES = ("zib", "wug", "dax", "fep", "toma", "blick")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen")
MOVES: dict[str, tuple[int, int]] = {"to the left": (0, -1), "to the right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPLITS = ("train", "val", "test")
TASKS = ("hallucination", "factuality")
HALLUCINATION_TYPES = ("absent", "colour", "size", "relation", "count")
CLAIM_TYPES = ("naming", "recolour", "remove", "move")
# Which kind of option each hallucination type perturbs; true options draw kinds with the same
# mix so the option kind carries no information about the label.
_HTYPE_KIND = {"absent": "exists", "colour": "exists", "size": "size", "relation": "relation", "count": "count"}
# Fixed template words; sample_texts() appends them so the tokenizer corpus covers every word.
_TEMPLATE_WORDS = ("There is are a A The the is In this game every object objects called was painted row column "
                   "removed moved one cell after photo taken")

Selector = dict[str, str]
Fact = dict[str, Any]
Obj = dict[str, Any]


@dataclass(frozen=True)
class SynthSpec:
    """Difficulty knobs; frozen and JSON-serialisable (``asdict``) so meta.json records it."""

    image_size: int = 112
    cell_px: int = 28  # one merged Qwen2.5-VL vision token (2x2 patches of 14 px)
    min_objects: int = 1
    max_objects: int = 5
    options_per_scene: tuple[int, int] = (2, 4)
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
    small_px: tuple[int, int] = (12, 14)
    large_px: tuple[int, int] = (22, 26)
    jitter_px: int = 2
    backgrounds: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (40, 40, 40))
    # Relative weights of hallucination types (task 1) and of context types (task 2).
    hallucination_weights: tuple[tuple[str, float], ...] = (
        ("absent", 1.0), ("colour", 1.0), ("size", 1.0), ("relation", 1.0), ("count", 1.0))
    claim_weights: tuple[tuple[str, float], ...] = (
        ("naming", 2.0), ("recolour", 1.0), ("remove", 1.0), ("move", 0.5))
    # Task 2: share of claims whose label flips when the context is ignored (where one exists),
    # so a model reading only the image scores about 1 - hard_share on them.
    hard_share: float = 0.5
    # Task 1: chance that a count option is about a shape present in the scene.
    present_count_share: float = 0.75
    # Task 2: what a claim may be about (attribute, size, relation, count); each claim type keeps the ones it has.
    claim_kinds: tuple[str, ...] = ("attr", "size", "relation", "count")

    def __post_init__(self) -> None:
        grid = self.image_size // self.cell_px
        lo, hi = self.options_per_scene
        checks = {
            "grid must be at least 1x1": grid >= 1,
            f"need 1 <= min_objects <= max_objects <= {grid * grid} (the {grid}x{grid} grid of "
            f"{self.cell_px}-px cells of a {self.image_size}-px image)": 1 <= self.min_objects <= self.max_objects <= grid * grid,
            "max_objects too large for number words": self.max_objects + 1 < len(NUMBER_WORDS),
            "need 1 <= options_per_scene[0] <= options_per_scene[1]": 1 <= lo <= hi,
            "unknown shape": set(self.shapes) <= set(PLURALS) and len(set(self.shapes)) == len(self.shapes) >= 2,
            "unknown colour": set(self.colours) <= set(PALETTE) and len(set(self.colours)) == len(self.colours) >= 2,
            "need more colour/shape pairs than objects": len(self.shapes) * len(self.colours) > self.max_objects,
            "object sizes must fit in a cell": 1 <= self.small_px[0] <= self.small_px[1] < self.large_px[0]
            <= self.large_px[1] <= self.cell_px,
            "unknown hallucination type": {k for k, _ in self.hallucination_weights} <= set(HALLUCINATION_TYPES)
            and sum(w for _, w in self.hallucination_weights) > 0,
            "unknown claim type": {k for k, _ in self.claim_weights} <= set(CLAIM_TYPES)
            and sum(w for _, w in self.claim_weights) > 0,
            "hard_share must be in [0, 1]": 0.0 <= self.hard_share <= 1.0,
            "present_count_share must be in [0, 1]": 0.0 <= self.present_count_share <= 1.0,
            "every claim type needs one of its claim_kinds": all(
                set(_CLAIM_KINDS.get(k, ())) & set(self.claim_kinds) for k, w in self.claim_weights if w > 0),
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid SynthSpec: " + "; ".join(bad))


# ---------------------------------------------------------------- semantics (label ground truth)

def _matches(obj: Obj, sel: Selector) -> bool:
    return all(obj[k] == v for k, v in sel.items())


def _relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    if rel == "left of":
        return a["col"] < b["col"]
    if rel == "right of":
        return a["col"] > b["col"]
    if rel == "above":
        return a["row"] < b["row"]
    return a["row"] > b["row"]


def holds(fact: Fact, objects: list[Obj]) -> bool:
    """Truth of a structured fact in a list of scene objects; the single source of labels."""
    kind = fact["kind"]
    if kind == "exists":
        return any(_matches(o, fact["sel"]) for o in objects)
    if kind == "count":
        return sum(_matches(o, fact["sel"]) for o in objects) == fact["n"]
    if kind == "relation":
        return any(_matches(a, fact["a"]) and _matches(b, fact["b"]) and a is not b
                   and _relation_holds(a, fact["rel"], b) for a in objects for b in objects)
    raise ValueError(f"unknown fact kind {kind!r}")


def apply_context(context: Fact, objects: list[Obj]) -> list[Obj]:
    """The scene after the change a task-2 context describes (naming rules change nothing)."""
    kind = context["kind"]
    if kind == "naming":
        return [dict(o) for o in objects]
    out = []
    for o in objects:
        if not _matches(o, context["target"]):
            out.append(dict(o))
        elif kind == "recolour":
            out.append({**o, "colour": context["to"]})
        elif kind == "move":
            out.append({**o, "row": o["row"] + context["drow"], "col": o["col"] + context["dcol"]})
        elif kind != "remove":
            raise ValueError(f"unknown context kind {kind!r}")
    return out


# ---------------------------------------------------------------- scenes and rendering

def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = [k for k, w in weights.items() if w > 0]
    return rng.choices(names, [weights[k] for k in names])[0]


def _make_scene(rng: random.Random, spec: SynthSpec) -> dict[str, Any]:
    grid = spec.image_size // spec.cell_px
    n = rng.randint(spec.min_objects, spec.max_objects)
    cells = rng.sample(range(grid * grid), n)
    pairs = rng.sample([(c, s) for c in spec.colours for s in spec.shapes], n)  # unique -> unambiguous names
    objects = []
    for cell, (colour, shape) in zip(cells, pairs):
        size = rng.choice(SIZES)
        px = rng.randint(*(spec.small_px if size == "small" else spec.large_px))
        row, col = divmod(cell, grid)
        slack = spec.cell_px - px
        jit = min(spec.jitter_px, slack // 2)
        x0 = col * spec.cell_px + slack // 2 + rng.randint(-jit, jit)
        y0 = row * spec.cell_px + slack // 2 + rng.randint(-jit, jit)
        objects.append({"shape": shape, "colour": colour, "size": size, "row": row, "col": col,
                        "bbox": [x0, y0, x0 + px, y0 + px]})
    return {"image_size": spec.image_size, "cell_px": spec.cell_px,
            "background": list(rng.choice(spec.backgrounds)), "objects": objects}


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene dict as an RGB image (also usable to re-render an augmented scene)."""
    size = scene["image_size"]
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["bbox"]
        x1, y1 = x1 - 1, y1 - 1  # PIL boxes are inclusive
        rgb = PALETTE[o["colour"]]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        shape = o["shape"]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=rgb)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=rgb)
        elif shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=rgb)
        elif shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
        else:  # cross
            span = x1 - x0 + 1
            bar = max(3, span // 3)
            off = (span - bar) // 2
            draw.rectangle((x0, y0 + off, x1, y0 + off + bar - 1), fill=rgb)
            draw.rectangle((x0 + off, y0, x0 + off + bar - 1, y1), fill=rgb)
    return img


# ---------------------------------------------------------------- text helpers

def _count_phrase(n: int, noun: str, plural: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural}"


def _there(n: int, noun: str, plural: str) -> str:
    return f"There {'is' if n == 1 else 'are'} {_count_phrase(n, noun, plural)}."


def _near_counts(true_n: int, spec: SynthSpec) -> list[int]:
    """The true count and its off-by-one neighbours: false counts stay plausible."""
    return [n for n in (true_n - 1, true_n, true_n + 1) if 0 <= n <= spec.max_objects]


def _pair(o: Obj) -> Selector:
    return {"colour": o["colour"], "shape": o["shape"]}


def _name(sel: Selector) -> str:
    return f"{sel['colour']} {sel['shape']}"


def _balanced(rng: random.Random, n: int) -> list[bool]:
    """Exactly half True (rounded down), shuffled: keeps every split inside 45-55 %."""
    labels = [i < n // 2 for i in range(n)]
    rng.shuffle(labels)
    return labels


# ---------------------------------------------------------------- task 1: hallucination

# A candidate is (fact, option, caption sentence, key); the key stops one caption from
# mentioning the same subject twice (e.g. "two circles" and "three circles").
Candidate = tuple[Fact, str, str, tuple]


def _exists_cand(c: str, s: str) -> Candidate:
    return ({"kind": "exists", "sel": {"colour": c, "shape": s}}, f"{c} {s}", f"There is a {c} {s}.",
            ("exists", c, s))


def _t1_candidates(rng: random.Random, kind: str, hallucinated: bool, objs: list[Obj], spec: SynthSpec,
                   true_counts: Counter[int]) -> list[Candidate]:
    """Options of one kind (or hallucination type) for a scene; the caller filters by truth."""
    present = {(o["colour"], o["shape"]) for o in objs}
    shapes = {o["shape"] for o in objs}
    if kind == "exists":
        return [_exists_cand(c, s) for c, s in sorted(present)]
    if kind == "absent":
        return [_exists_cand(c, s) for s in spec.shapes if s not in shapes for c in spec.colours]
    if kind == "colour":
        return [_exists_cand(c, s) for s in spec.shapes if s in shapes for c in spec.colours if (c, s) not in present]
    if kind == "size":
        return [({"kind": "exists", "sel": {**_pair(o), "size": z}}, f"the {_name(_pair(o))} is {z}",
                 f"The {_name(_pair(o))} is {z}.", ("size", o["colour"], o["shape"]))
                for o in objs for z in SIZES]
    if kind == "relation":
        return [({"kind": "relation", "a": _pair(a), "rel": rel, "b": _pair(b)},
                 f"{_name(_pair(a))} {rel} {_name(_pair(b))}",
                 f"The {_name(_pair(a))} is {rel} the {_name(_pair(b))}.",
                 ("relation",) + tuple(sorted([_name(_pair(a)), _name(_pair(b))])))
                for a in objs for b in objs if a is not b for rel in RELATIONS]
    counts = {s: sum(o["shape"] == s for o in objs) for s in spec.shapes}

    def cand(s: str, n: int) -> Candidate:
        return ({"kind": "count", "sel": {"shape": s}, "n": n}, _count_phrase(n, s, PLURALS[s]),
                _there(n, s, PLURALS[s]), ("count", s))

    if hallucinated:
        # Aim false counts at the numbers true counts have shown so far in this split, so the
        # number alone does not give the label away.
        ns = range(spec.max_objects + 1)
        target = rng.choices(ns, [true_counts[n] + 1 for n in ns])[0]
        near = [s for s in spec.shapes if abs(counts[s] - target) == 1]
        if near:
            return [cand(s, target) for s in near]
    pool = sorted(shapes) if shapes and rng.random() < spec.present_count_share else list(spec.shapes)
    s = rng.choice(pool)
    return [cand(s, n) for n in _near_counts(counts[s], spec)]


def _t1_example(rng: random.Random, spec: SynthSpec, labels: list[bool], true_counts: Counter[int]) -> dict[str, Any]:
    """One scene with a caption whose options follow the given hallucination labels;
    true_counts tallies the numbers of true count options emitted so far (updated here)."""
    scene = _make_scene(rng, spec)
    objs = scene["objects"]
    h_weights = dict(spec.hallucination_weights)
    k_weights: dict[str, float] = {}
    for htype, w in h_weights.items():
        k_weights[_HTYPE_KIND[htype]] = k_weights.get(_HTYPE_KIND[htype], 0.0) + w
    options, sentences, flags, facts, keys = [], [], [], [], set()
    for hallucinated in labels:
        for _ in range(8):  # rarely needed: a type may be infeasible or exhausted for this scene
            kind = _weighted(rng, h_weights if hallucinated else k_weights)
            cands = [c for c in _t1_candidates(rng, kind, hallucinated, objs, spec, true_counts)
                     if holds(c[0], objs) != hallucinated and c[3] not in keys]
            if cands:
                fact, option, sentence, key = rng.choice(cands)
                keys.add(key)
                if fact["kind"] == "count" and not hallucinated:
                    true_counts[fact["n"]] += 1
                options.append(option)
                sentences.append(sentence)
                flags.append(hallucinated)
                facts.append({**fact, "type": kind if hallucinated else "true"})
                break
    return {"caption": " ".join(sentences), "options": options, "hallucinated": flags,
            "scene": scene, "facts": facts}


# ---------------------------------------------------------------- task 2: factuality


# A claim candidate is (claim fact, claim text); builders group them by kind so every kind
# gets a fair share whatever its number of candidates.
ClaimCands = dict[str, list[tuple[Fact, str]]]


def _rel_claims(sel: Selector, text: str, others: list[Obj], article: str) -> list[tuple[Fact, str]]:
    """Relations between a subject and each other object, in both directions."""
    out = []
    for o in others:
        ref = _pair(o)
        for rel in RELATIONS:
            out.append(({"kind": "relation", "a": sel, "rel": rel, "b": ref},
                        f"{article.capitalize()} {text} is {rel} the {_name(ref)}."))
            out.append(({"kind": "relation", "a": ref, "rel": rel, "b": sel},
                        f"The {_name(ref)} is {rel} {article} {text}."))
    return out


def _naming(rng: random.Random, objs: list[Obj], spec: SynthSpec) -> tuple[Fact, str, ClaimCands] | None:
    """'Every red object is called a zib' + a claim about zibs: the image alone lacks the name."""
    attr = rng.choice(("colour", "shape"))
    other, other_vals = ("shape", spec.shapes) if attr == "colour" else ("colour", spec.colours)
    present = sorted({o[attr] for o in objs})
    value = rng.choice(present if rng.random() < 0.8 else list(spec.colours if attr == "colour" else spec.shapes))
    word = rng.choice(NAMES)
    text = (f"In this game, every {value} object is called a {word}." if attr == "colour"
            else f"In this game, every {value} is called a {word}.")
    named = {attr: value}
    true_n = sum(_matches(o, named) for o in objs)
    kinds: ClaimCands = {
        "attr": [({"kind": "exists", "sel": {**named, other: v}},
                  f"A {word} is {'a ' if other == 'shape' else ''}{v}.") for v in other_vals],
        "size": [({"kind": "exists", "sel": {**named, "size": z}}, f"A {word} is {z}.") for z in SIZES],
        "relation": _rel_claims(named, word, [o for o in objs if not _matches(o, named)], "a"),
        "count": [({"kind": "count", "sel": named, "n": n}, _there(n, word, word + "s"))
                  for n in _near_counts(true_n, spec)],
    }
    return {"kind": "naming", "name": word, "attr": attr, "value": value}, text, kinds


def _recolour(rng: random.Random, objs: list[Obj], spec: SynthSpec) -> tuple[Fact, str, ClaimCands] | None:
    """'The green square was painted yellow': claims about the yellow square need its position/size."""
    o = rng.choice(objs)
    present = {(p["colour"], p["shape"]) for p in objs}
    targets = [c for c in spec.colours if (c, o["shape"]) not in present]
    if not targets:
        return None
    old, new, shape = o["colour"], rng.choice(targets), o["shape"]
    context = {"kind": "recolour", "target": _pair(o), "to": new}
    world = apply_context(context, objs)
    sel = {"colour": new, "shape": shape}
    counts = []
    for c in (new, old):
        true_n = sum(p["colour"] == c for p in world)
        counts += [({"kind": "count", "sel": {"colour": c}, "n": n}, _there(n, f"{c} object", f"{c} objects"))
                   for n in _near_counts(true_n, spec)]
    kinds: ClaimCands = {
        "size": [({"kind": "exists", "sel": {**sel, "size": z}}, f"The {new} {shape} is {z}.") for z in SIZES],
        "relation": _rel_claims(sel, _name(sel), [p for p in objs if p is not o], "the"),
        "count": counts,
    }
    return context, f"The {old} {shape} was painted {new} after the photo was taken.", kinds


def _remove(rng: random.Random, objs: list[Obj], spec: SynthSpec) -> tuple[Fact, str, ClaimCands] | None:
    """'The red circle was removed': counting what is left needs the image too."""
    o = rng.choice(objs)
    context = {"kind": "remove", "target": _pair(o)}
    world = apply_context(context, objs)
    counts = []
    for sel, noun, plural in (({"shape": o["shape"]}, o["shape"], PLURALS[o["shape"]]),
                              ({"colour": o["colour"]}, f"{o['colour']} object", f"{o['colour']} objects"),
                              ({}, "object", "objects")):
        true_n = sum(_matches(p, sel) for p in world)
        counts += [({"kind": "count", "sel": sel, "n": n}, _there(n, noun, plural)) for n in _near_counts(true_n, spec)]
    return context, f"The {_name(_pair(o))} was removed after the photo was taken.", {"count": counts}


def _move(rng: random.Random, objs: list[Obj], spec: SynthSpec) -> tuple[Fact, str, ClaimCands] | None:
    """'The red circle was moved one cell up': relations after the move need the old position."""
    if len(objs) < 2:
        return None
    grid = spec.image_size // spec.cell_px
    o = rng.choice(objs)
    taken = {(p["row"], p["col"]) for p in objs}
    dirs = [d for d, (dr, dc) in MOVES.items()
            if 0 <= o["row"] + dr < grid and 0 <= o["col"] + dc < grid and (o["row"] + dr, o["col"] + dc) not in taken]
    if not dirs:
        return None
    d = rng.choice(dirs)
    dr, dc = MOVES[d]
    context = {"kind": "move", "target": _pair(o), "drow": dr, "dcol": dc}
    kinds: ClaimCands = {"relation": _rel_claims(_pair(o), _name(_pair(o)), [p for p in objs if p is not o], "the")}
    return context, f"The {_name(_pair(o))} was moved one cell {d} after the photo was taken.", kinds


_BUILDERS = {"naming": _naming, "recolour": _recolour, "remove": _remove, "move": _move}
_CLAIM_KINDS = {"naming": ("attr", "size", "relation", "count"), "recolour": ("size", "relation", "count"),
                "remove": ("count",), "move": ("relation",)}


def _ignoring_context(fact: Fact, context: Fact) -> Fact:
    """The claim as read without the context: a naming rule's name then means any object."""
    if context["kind"] != "naming":
        return fact
    attr, value = context["attr"], context["value"]
    return {k: ({kk: vv for kk, vv in v.items() if kk != attr} if isinstance(v, dict) and v.get(attr) == value else v)
            for k, v in fact.items()}


def _t2_example(rng: random.Random, spec: SynthSpec, label: bool,
                true_counts: Counter[tuple[tuple, int]]) -> dict[str, Any]:
    """One scene + context + claim with the requested label.

    Context type and claim kind are drawn before the scene, and scenes are resampled until
    one admits the label, so type and kind say nothing about the label. False count claims
    aim at numbers true ones have shown (true_counts, updated here) for the same reason.
    """
    ctype = _weighted(rng, dict(spec.claim_weights))
    kind = rng.choice([k for k in _CLAIM_KINDS[ctype] if k in spec.claim_kinds])
    ns = range(spec.max_objects + 1)
    for _ in range(1000):
        scene = _make_scene(rng, spec)
        objs = scene["objects"]
        built = _BUILDERS[ctype](rng, objs, spec)
        if built is None:
            continue
        context, context_text, kinds = built
        world = apply_context(context, objs)
        cands = [(f, t, holds(_ignoring_context(f, context), objs)) for f, t in kinds[kind] if holds(f, world) == label]
        if cands and kind == "count":
            group = rng.choice(sorted({(ctype, tuple(sorted(c[0]["sel"]))) for c in cands}))
            cands = [c for c in cands if (ctype, tuple(sorted(c[0]["sel"]))) == group]
            if not label:
                target = rng.choices(ns, [true_counts[(group, n)] + 1 for n in ns])[0]
                cands = [c for c in cands if c[0]["n"] == target]
        if not cands:
            continue
        flips = [c for c in cands if c[2] != label]  # label depends on the context
        keeps = [c for c in cands if c[2] == label]
        pool = flips if flips and (not keeps or rng.random() < spec.hard_share) else keeps
        fact, claim, ignored = rng.choice(pool)
        if kind == "count" and label:
            true_counts[(group, fact["n"])] += 1
        return {"context": context_text, "claim": claim, "label": label, "scene": scene,
                "facts": {"context": context, "claim": fact, "type": ctype, "kind": kind,
                          "hard": ignored != label}}
    raise RuntimeError(f"SynthSpec admits no {ctype}/{kind} claim with label {label}; check claim_weights "
                       "and object counts")


# ---------------------------------------------------------------- public API

def _examples(task: str, rng: random.Random, n: int, spec: SynthSpec) -> list[dict[str, Any]]:
    """n examples of one task with a balanced label schedule drawn from rng."""
    if task == "factuality":
        claim_counts: Counter[tuple[tuple, int]] = Counter()
        return [_t2_example(rng, spec, label, claim_counts) for label in _balanced(rng, n)]
    ks = [rng.randint(*spec.options_per_scene) for _ in range(n)]
    labels = _balanced(rng, sum(ks))
    out, start, true_counts = [], 0, Counter()
    for k in ks:
        out.append(_t1_example(rng, spec, labels[start:start + k], true_counts))
        start += k
    return out


def generate(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 300, n_test: int = 500,
             spec: SynthSpec = SynthSpec()) -> dict:
    """Write both tasks' splits (JSONL + PNG) and meta.json under out_dir; returns the meta dict.

    n_* count scenes per task per split. Each (seed, task, split) has its own random stream,
    so output is byte-identical for a given seed and one split's size never changes another's.
    """
    out = Path(out_dir)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    counts: dict[str, dict[str, int]] = {t: {} for t in TASKS}
    balance: dict[str, dict[str, float | None]] = {t: {} for t in TASKS}
    n_options: dict[str, int] = {}
    for task in TASKS:
        for split in SPLITS:
            positives, total = write_split(out, seed, task, split, sizes[split], spec)
            counts[task][split] = sizes[split]
            balance[task][split] = positives / total if total else None
            if task == "hallucination":
                n_options[split] = total
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "counts": counts, "options": n_options,
            "class_balance": balance, "spec": asdict(spec)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return json.loads(json.dumps(meta))  # same plain-JSON form as the file (tuples become lists)


def write_split(out: Path, seed: int, task: str, split: str, n: int, spec: SynthSpec) -> tuple[int, int]:
    """Write `<out>/<task>/<split>.jsonl` and its images from the (seed, task, split) stream; returns (positive
    labels, labels). Any split name is its own stream: `unlabeled` never repeats train, val or test."""
    (out / task / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}/{task}/{split}")
    positives = total = 0
    with open(out / task / f"{split}.jsonl", "w", encoding="utf-8") as fh:
        for i, ex in enumerate(_examples(task, rng, n, spec)):
            image = f"images/{split}_{i:06d}.png"
            render(ex["scene"]).save(out / task / image, format="PNG", compress_level=1)
            fh.write(json.dumps({"id": f"{task[0]}-{split}-{i:06d}", "task": task, "image": image, **ex}) + "\n")
            labels = ex["hallucinated"] if task == "hallucination" else [ex["label"]]
            positives, total = positives + sum(labels), total + len(labels)
    return positives, total


def vocabulary() -> list[str]:
    """Every word (and punctuation mark) any spec can make the generator emit."""
    words = _TEMPLATE_WORDS.split() + list(PALETTE) + list(PLURALS) + list(PLURALS.values()) + list(SIZES)
    words += [w for phrase in RELATIONS + tuple(MOVES) for w in phrase.split()]
    words += list(NAMES) + [n + "s" for n in NAMES] + list(NUMBER_WORDS) + [".", ","]
    return sorted(set(words))


def describe(scene: dict[str, Any]) -> str:
    """Every object in reading order with all its attributes and its cell: the dense text that
    grounding pre-training teaches a level to produce from the image alone."""
    objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
    return " ".join(f"A {o['size']} {o['colour']} {o['shape']} in row {NUMBER_WORDS[o['row'] + 1]} "
                    f"column {NUMBER_WORDS[o['col'] + 1]}." for o in objs)


def random_scenes(seed: int, n: int, spec: SynthSpec = SynthSpec()) -> list[dict[str, Any]]:
    """n fresh scenes, deterministic in (seed, n, spec): unlimited unlabelled images for pre-training."""
    rng = random.Random(f"{seed}/scenes")
    return [_make_scene(rng, spec) for _ in range(n)]


def sample_texts(n: int, seed: int = 0, spec: SynthSpec = SynthSpec()) -> list[str]:
    """Captions, options, contexts, claims and scene descriptions of n scenes per task, plus one line
    holding the whole vocabulary, so a tokenizer trained on it covers every word the generator emits."""
    rng = random.Random(f"{seed}/texts")
    texts: list[str] = [describe(s) for s in random_scenes(seed, n, spec)]
    for ex in _examples("hallucination", rng, n, spec):
        texts += [ex["caption"], *ex["options"]]
    for ex in _examples("factuality", rng, n, spec):
        texts += [ex["context"], ex["claim"]]
    return texts + [" ".join(vocabulary())]
