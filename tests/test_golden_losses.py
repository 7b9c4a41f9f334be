"""Golden values: each stage kind's loss terms on one fixed batch, stored from the code before issue 14's
refactor, must stay equal (no behaviour change from moving code or typing the contract).

The stage losses are built the way a run builds them: `configs/quickstart.yaml` → `plan_stages` → the
orchestrator's stage loss settings → the worker's stage loss, fed teacher outputs through the real wire
format (`wire_outputs` → `from_wire`). Grounding goes through `grounding_loss` on a deterministic stub model.
Stored per kind: the loss and every logged term (as `float.hex`), and the gradient the loss sends back into
the student's logits (or the stub's weights) as its norm and its dot products with fixed random directions.

The check is to float32 rounding, not bitwise: torch picks its CPU kernels by instruction set (AVX2, AVX-512),
and the same code then differs in the last bit or two (measured: at most 3e-7 relative in a loss term, 2e-7 of
the largest gradient entry). A real change to a loss moves these numbers by orders of magnitude more.

`python tests/test_golden_losses.py --write` rewrites the fixture: only when a change of the numbers is
intended, and say so in the commit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orchestrator.config.schema import load_config
from orchestrator.run.kinds import plan_stages
from workers.training.grounding import IGNORE, grounding_loss
from workers.teachers.outputs import from_wire, wire_outputs

FIXTURE = Path(__file__).parent / "golden" / "stage_losses.json"
CONFIG = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
N, VOCAB, PADDED = 8, 96, 101  # the student's table is padded past the tokenizer's vocabulary, as real ones are
LABEL_IDS = (7, 11)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _student_logits() -> torch.Tensor:
    logits = torch.randn(N, PADDED, generator=_gen(1), dtype=torch.float64).float() * 3
    return logits.requires_grad_()


def _teacher_out(seed: int, k: int, temperature: float) -> dict:
    logits = (torch.randn(N, VOCAB, generator=_gen(seed), dtype=torch.float64) * 4).float()
    logits[:, LABEL_IDS[0]] += torch.linspace(-6, 6, N)  # teachers from confidently wrong to confidently right
    return from_wire(wire_outputs(logits, LABEL_IDS, k, temperature))


def _targets() -> torch.Tensor:
    return torch.tensor([1, 0] * (N // 2))


RTOL = 2e-6  # float32 rounding across CPU kernels, with room (see the docstring)
DIRECTIONS = 8


def _grad_summary(t: torch.Tensor) -> dict:
    """The gradient's norm and its projections on fixed random directions: any change to it beyond
    rounding moves them."""
    g = t.detach().double().flatten()
    dirs = torch.randn(DIRECTIONS, g.numel(), generator=_gen(7), dtype=torch.float64)
    return {"size": g.numel(), "norm": g.norm().item().hex(), "projections": [float(v).hex() for v in dirs @ g]}


def _plan(kind: str):
    cfg = load_config(CONFIG)
    return cfg, next(p for p in plan_stages(cfg) if p.kind.name == kind and (kind != "ppod" or p.level == "S"))


def stage_loss_for(cfg, plan, label_ids, vocab):
    """The worker's stage loss as a run builds it (the only part of this file that follows the API)."""
    from orchestrator.run.stages import stage_loss
    from workers.training.objectives import StageObjective

    names = {t.stage: f"pool-{t.stage}" for t in plan.teachers}
    return StageObjective(stage_loss(cfg, plan, names, "/nonexistent/cache"), label_ids, vocab=vocab)


def _stage_values(kind: str) -> dict:
    cfg, plan = _plan(kind)
    loss_fn = stage_loss_for(cfg, plan, LABEL_IDS, VOCAB)
    outs = [_teacher_out(100 + i, cfg.teachers.k, t.temperature) for i, t in enumerate(plan.teachers)]
    logits = _student_logits()
    loss, terms = loss_fn(logits, _targets(), outs)
    loss.backward()
    return {"loss": loss.item().hex(), "terms": {k: float(v).hex() for k, v in sorted(terms.items())},
            "grad": _grad_summary(logits.grad)}


class _StubLM(torch.nn.Module):
    """A causal LM's interface with a fixed embedding table as its whole model: logits = table[input_ids]."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=_gen(2), dtype=torch.float64).float())

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])


def _grounding_values() -> dict:
    ids = torch.randint(0, VOCAB, (4, 12), generator=_gen(3))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # the prompt
    labels[2, 9:] = IGNORE  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model = _StubLM()
    loss = grounding_loss(model, batch)
    loss.backward()
    return {"loss": loss.item().hex(), "terms": {}, "grad": _grad_summary(model.table.grad)}


def _values(kind: str) -> dict:
    return _grounding_values() if kind == "grounding" else _stage_values(kind)


KINDS = ("direct", "ppod", "tcrd", "grounding")


def write_fixture() -> None:
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({k: _values(k) for k in KINDS}, indent=2, sort_keys=True) + "\n")


def _close(got: str, want: str, scale: float) -> bool:
    return abs(float.fromhex(got) - float.fromhex(want)) <= RTOL * scale


@pytest.mark.parametrize("kind", KINDS)
def test_stage_loss_terms_equal_to_stored(kind):
    want = json.loads(FIXTURE.read_text())[kind]
    got = _values(kind)
    assert got["terms"].keys() == want["terms"].keys(), f"{kind}: logged terms changed"
    for name in ("loss", *want["terms"]):
        g, w = (got[name], want[name]) if name == "loss" else (got["terms"][name], want["terms"][name])
        assert _close(g, w, abs(float.fromhex(w))), f"{kind}: {name} changed: {float.fromhex(g)} was {float.fromhex(w)}"
    norm = float.fromhex(want["grad"]["norm"])
    assert _close(got["grad"]["norm"], want["grad"]["norm"], norm), f"{kind}: gradient norm changed"
    assert got["grad"]["size"] == want["grad"]["size"]
    for i, (g, w) in enumerate(zip(got["grad"]["projections"], want["grad"]["projections"], strict=True)):
        # a projection on a random direction of norm ~sqrt(n) moves by at most |rounding error| * sqrt(n)
        assert _close(g, w, norm * math.sqrt(want["grad"]["size"])), f"{kind}: gradient changed (direction {i})"


def test_golden_batch_exercises_every_term():
    """The stored values mean something: PPOD has two teachers, TCRD couples both, the coupling is neither 0
    nor 1 everywhere, and the padded rows past the vocabulary receive no gradient."""
    stored = json.loads(FIXTURE.read_text())
    assert set(stored) == set(KINDS)
    assert list(stored["direct"]["terms"]) == ["loss_ce"]
    assert sum(k.startswith("loss_kd_") for k in stored["ppod"]["terms"]) == 2
    coupling = [float.fromhex(v) for k, v in stored["tcrd"]["terms"].items() if k.startswith("coupling_")]
    assert len(coupling) == 2 and all(0.05 < c < 0.95 for c in coupling)
    cfg, plan = _plan("tcrd")
    logits = _student_logits()
    outs = [_teacher_out(100 + i, cfg.teachers.k, t.temperature) for i, t in enumerate(plan.teachers)]
    stage_loss_for(cfg, plan, LABEL_IDS, VOCAB)(logits, _targets(), outs)[0].backward()
    assert np.all(logits.grad[:, VOCAB:].numpy() == 0)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_losses.py --write   (rewrites the golden fixture)")
    write_fixture()
