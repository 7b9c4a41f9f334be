"""What the tiny bases are pretrained on: skills, never the benchmark.

Every real pyramid level starts from a checkpoint that already sees and reads. The embedded tiny levels get the
same start from dialogues about generated scenes: a description of every object, open questions with short
generated answers (colour, shape, size, cell, count, what lies left of / above what) and reading items (a word
defined in one sentence and asked about in the next, alone or together with the image: the two-step lookup a
naming claim needs). The scenes come from the generator's own sampler and renderer, on a seed stream of their
own (`pretrain/<seed>/…`, never `<seed>/<task>/<split>` nor grounding's `<seed>/scenes`); the templates are this
module's own. No benchmark prompt, caption, option, context sentence or claim, and no yes/no or true/false
judgement, is ever in it (tests/test_pretrain_corpus.py checks both on a large sample).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from workers.data import synth

DESCRIBE = "Describe the picture."
# made-up words that the reading items define; the benchmark's naming words are among them (they are words, not
# judgements) so every level has seen them bound to a meaning before any task tuning
NONCE_WORDS = synth.NAMES + ("blicket", "gorp", "mip", "tazz", "vonk", "kiki", "lupa", "rask", "snee", "yorb")
NO_COUNT = "none"  # the answer to a count of zero (the benchmark's own word for it is "no")

Turn = tuple[str, str]  # (question, answer)


@dataclass(frozen=True)
class Dialogue:
    """One pretraining item: a scene (rendered as the image) and the turns asked about it."""

    scene: dict[str, Any]
    turns: list[Turn]


def stream(seed: int, name: str) -> random.Random:
    """The pretraining seed stream `name`: domain-separated from every benchmark split and from grounding."""
    return random.Random(f"pretrain/{seed}/{name}")


def dialogues(seed: int, n: int, spec: synth.SynthSpec, questions: int = 6, start: int = 0) -> list[Dialogue]:
    """Dialogues `start` … `start + n - 1` of pretraining stream `seed` (item i is the same whatever n and start)."""
    out = []
    for i in range(start, start + n):
        rng = stream(seed, f"item/{i}")
        scene = synth._make_scene(rng, spec)
        out.append(Dialogue(scene, [(DESCRIBE, describe(scene))] + [ask(rng, scene, spec) for _ in range(questions)]))
    return out


def _cell(o: dict) -> str:
    return f"row {synth.NUMBER_WORDS[o['row'] + 1]}, column {synth.NUMBER_WORDS[o['col'] + 1]}"


def _count(n: int) -> str:
    return synth.NUMBER_WORDS[n] if n else NO_COUNT


def _names(objs: list[dict]) -> str:
    ordered = sorted(objs, key=lambda o: (o["row"], o["col"]))
    return ", ".join(f"{o['colour']} {o['shape']}" for o in ordered) or NO_COUNT


def describe(scene: dict[str, Any]) -> str:
    """Every object in reading order: size, colour, shape and cell."""
    objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
    return "; ".join(f"{o['size']} {o['colour']} {o['shape']} at {_cell(o)}" for o in objs) + "."


def ask(rng: random.Random, scene: dict[str, Any], spec: synth.SynthSpec) -> Turn:
    """One open question about the scene with its short generated answer, of a kind drawn uniformly."""
    return rng.choice(QUESTIONS)(rng, scene["objects"], spec)


def _colour_at(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    o = rng.choice(objs)
    return f"What colour is the object at {_cell(o)}?", o["colour"]


def _shape_at(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    grid = spec.image_size // spec.cell_px
    row, col = rng.randrange(grid), rng.randrange(grid)
    here = [o for o in objs if (o["row"], o["col"]) == (row, col)]
    cell = _cell({"row": row, "col": col})
    return f"What is at {cell}?", (f"{here[0]['colour']} {here[0]['shape']}" if here else "nothing")


def _size_of(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    o = rng.choice(objs)
    return f"What size is the {o['colour']} {o['shape']}?", o["size"]


def _where(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    o = rng.choice(objs)
    return f"Where is the {o['colour']} {o['shape']}?", _cell(o)


def _how_many(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    what = rng.choice(("shape", "colour", "all"))
    if what == "shape":
        shape = rng.choice(spec.shapes)
        return f"How many {synth.PLURALS[shape]} can you see?", _count(sum(o["shape"] == shape for o in objs))
    if what == "colour":
        colour = rng.choice(spec.colours)
        return f"How many {colour} things can you see?", _count(sum(o["colour"] == colour for o in objs))
    return "How many things can you see?", _count(len(objs))


_SIDES = {"left of": ("col", -1), "right of": ("col", 1), "above": ("row", -1), "below": ("row", 1)}


def _beside(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    """What lies on one side of an object (anywhere on that side, as the relations are defined)."""
    o, side = rng.choice(objs), rng.choice(list(_SIDES))
    axis, sign = _SIDES[side]
    found = [p for p in objs if p is not o and (p[axis] - o[axis]) * sign > 0]
    return f"What lies {side} the {o['colour']} {o['shape']}?", _names(found)


def _define(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    """Text alone: a word defined in one sentence, asked about in the next."""
    word = rng.choice(NONCE_WORDS)
    value = rng.choice(spec.colours + spec.shapes + synth.SIZES)
    return f"Say {word} means {value}. What does {word} mean?", value


def _lookup(rng: random.Random, objs: list[dict], spec: synth.SynthSpec) -> Turn:
    """Two steps: the definition in the text, then the object in the image."""
    word, o = rng.choice(NONCE_WORDS), rng.choice(objs)
    by = rng.choice(("colour", "shape"))
    head = (f"Say {word} stands for anything {o['colour']}." if by == "colour"
            else f"Say {word} stands for any {o['shape']}.")
    same = [p for p in objs if p[by] == o[by]]
    if len(same) > 1 or rng.random() < 0.3:
        return f"{head} How many {word}s can you see?", _count(len(same))
    attr = rng.choice([a for a in ("colour", "shape", "size") if a != by])
    return f"{head} What {attr} is the {word}?", o[attr]


QUESTIONS = (_colour_at, _shape_at, _size_of, _where, _how_many, _beside, _define, _lookup)


def texts(seed: int, n: int, spec: synth.SynthSpec) -> list[str]:
    """The words of n dialogues (tokenizer training): every question and answer."""
    return [part for d in dialogues(seed, n, spec) for turn in d.turns for part in turn]
