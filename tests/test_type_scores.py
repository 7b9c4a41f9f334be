"""Scores per benchmark type (`workers.inference.type_scores`) and their place in report.json / report.md, on hand-built
records and decisions whose numbers are worked out by hand below."""

from __future__ import annotations

import json

import numpy as np

from orchestrator.report.run_report import write_report
from orchestrator.report.stage_result import StageResult
from workers.inference.type_scores import type_scores


def _exists(kind: str, size: str | None = None) -> dict:
    sel = {"colour": "red", "shape": "circle", **({"size": size} if size else {})}
    return {"kind": "exists", "sel": sel, "type": kind}


# Task 1: (options' facts, gold hallucinated, P(hallucinated)); decision = P ≥ 0.5.
OPTIONS = [
    ("h1", [_exists("absent"), _exists("true"), _exists("true", "small"), _exists("size", "large")],
     [1, 0, 0, 1], [0.9, 0.2, 0.7, 0.3]),  # absent hit, exists hit, size-true miss, size miss
    ("h2", [_exists("colour"), _exists("true"), {"kind": "relation", "rel": "left of", "type": "relation"}],
     [1, 0, 1], [0.4, 0.6, 0.8]),  # colour miss, exists miss, relation hit
    ("h3", None, [1, 0], [0.9, 0.9]),  # no facts: left out
]
# Task 2: (facts, gold label, P(true)).
CLAIMS = [
    ("f1", {"type": "naming", "kind": "count", "hard": True}, 1, 0.8),  # hit
    ("f2", {"type": "naming", "kind": "attr", "hard": False}, 0, 0.7),  # miss
    ("f3", {"type": "move", "kind": "relation", "hard": True}, 0, 0.1),  # hit
    ("f4", None, 1, 0.1),  # no facts: left out
    ("f5", "a note from another dataset", 1, 0.1),  # facts of another shape: left out
]


def _scored() -> tuple[list[dict], list[dict], np.ndarray]:
    records, positions, prob = [], [], []
    for rid, facts, targets, p in OPTIONS:
        records.append({"id": rid, "task": "hallucination", "options": [f"o{i}" for i in range(len(targets))],
                        "hallucinated": [bool(t) for t in targets], **({"facts": facts} if facts else {})})
        positions += [{"record_id": rid, "task": "hallucination", "target": t} for t in targets]
        prob += p
    for rid, facts, target, p in CLAIMS:
        records.append({"id": rid, "task": "factuality", "label": bool(target), **({"facts": facts} if facts else {})})
        positions.append({"record_id": rid, "task": "factuality", "target": target})
        prob.append(p)
    return records, positions, np.array(prob)


EXPECTED = {
    "hallucination": {
        # true `exists` options: h1's hit, h2's miss → specificity 1/2, shared by absent and colour
        "absent": {"recall": 1.0, "n": 1, "kind": "exists", "specificity": 0.5, "n_true": 2},
        "colour": {"recall": 0.0, "n": 1, "kind": "exists", "specificity": 0.5, "n_true": 2},
        "size": {"recall": 0.0, "n": 1, "kind": "size", "specificity": 0.0, "n_true": 1},
        "relation": {"recall": 1.0, "n": 1, "kind": "relation", "specificity": None, "n_true": 0},
    },
    "factuality": {
        "type": {"naming": {"accuracy": 0.5, "n": 2}, "move": {"accuracy": 1.0, "n": 1}},
        "hard": {"yes": {"accuracy": 1.0, "n": 2}, "no": {"accuracy": 0.0, "n": 1}},
    },
}


def test_scores_per_type_by_hand():
    scores = type_scores(*_scored())
    assert scores == EXPECTED
    assert list(scores["hallucination"]) == ["absent", "colour", "size", "relation"]  # the generator's order
    assert list(scores["factuality"]["type"]) == ["naming", "move"]


def test_no_facts_or_no_labels_give_no_breakdown():
    records, positions, prob = _scored()
    bare = [{k: v for k, v in r.items() if k != "facts"} for r in records]
    assert type_scores(bare, positions, prob) == {}
    unlabelled = [{**p, "target": -1} for p in positions]
    assert type_scores(records, unlabelled, prob) == {}
    only_task2 = [r for r in records if r["task"] == "factuality"]
    assert list(type_scores(only_task2, positions, prob)) == ["factuality"]


def _stage_row(scored: tuple, shift: float, types: bool = True) -> StageResult:
    """A stage's result; without `types`, one recorded before per-type scores were kept."""
    per_type = {"test_types": type_scores(*scored), "test_shift_types": type_scores(*scored[:2], scored[2] + shift)}
    metrics = {f"{t}/{c}": 0.5 for t in ("hallucination", "factuality") for c in ("f1", "accuracy", "auroc", "ece")}
    return StageResult("S", "direct", "", {}, "", "", 0.0, params=1e6, samples_per_s=10.0, test=metrics,
                       test_shift=metrics, **(per_type if types else {}))


def test_report_holds_the_breakdown_per_row(tmp_path):
    """Every row gets its own decisions' breakdown (the +shift row: the shifted ones); a stage recorded before
    breakdowns existed (no `test_types`) just has none."""
    scored = _scored()
    old = _stage_row(scored, 0.0, types=False)
    report = write_report(tmp_path, {"L-direct": old, "S-direct": _stage_row(scored, 0.25)})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report and "types" not in on_disk["rows"]["L-direct"]
    assert on_disk["rows"]["S-direct"]["types"] == EXPECTED
    # +0.25 lifts h1's size option (0.3) and h2's colour option (0.4) over 0.5; no other decision changes.
    shifted = on_disk["rows"]["S-direct+shift"]["types"]
    assert {t: s["recall"] for t, s in shifted["hallucination"].items()} == {"absent": 1.0, "colour": 1.0,
                                                                              "size": 1.0, "relation": 1.0}
    assert shifted["factuality"] == EXPECTED["factuality"]
    md = (tmp_path / "report.md").read_text()
    assert "## Per type (test)" in md
    assert "| model | absent (1 / 2) | colour (1 / 2) | size (1 / 1) | relation (1 / 0) |" in md
    assert "| S-direct | 1.000 / 0.500 | 0.000 / 0.500 | 0.000 / 0.000 | 1.000 / – |" in md
    assert "| model | naming (2) | move (1) | hard: yes (2) | hard: no (1) |" in md
    assert "| S-direct | 0.500 | 1.000 | 1.000 | 0.000 |" in md
    assert "| L-direct |" not in md.split("## Per type")[1]
    plain = write_report(tmp_path, {"L-direct": old})
    assert "types" not in plain["rows"]["L-direct"] and "Per type" not in (tmp_path / "report.md").read_text()
