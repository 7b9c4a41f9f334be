"""Test scores broken down by benchmark type, from each record's `facts` (the structured truth `workers.data.synth`
writes): one macro-F1 per task hides which kinds of hallucination a model catches and which claims it gets
right. Records without facts (or with facts of another shape) are left out, so any data file is accepted."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from workers.data.synth import CLAIM_TYPES, HALLUCINATION_TYPES


def type_scores(records: list[dict], positions: list[dict], prob: np.ndarray) -> dict:
    """Per-type scores of the decisions P(positive) ≥ 0.5 (`positions`/`prob` as `evaluate.score_records`
    returns them) on labelled records with facts; {} when no record has any.

    hallucination: per hallucination type, `recall` on its (hallucinated) options, and `specificity` on the true
    options of the same kind (`kind`: absent and colour options are existence claims, so they share the
    `exists` true options), each with its count (`n`, `n_true`).
    factuality: `accuracy` (with `n`) per context `type`, and per `hard` (`yes`: the claim's label flips when
    the context is ignored)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for position, p in zip(positions, prob.tolist()):
        if position["target"] >= 0:
            hits[position["record_id"]].append((p >= 0.5) == bool(position["target"]))
    out = {"hallucination": _option_scores([r for r in records if r["task"] == "hallucination"], hits),
           "factuality": _claim_scores([r for r in records if r["task"] == "factuality"], hits)}
    return {task: scores for task, scores in out.items() if scores}


def _option_scores(records: list[dict], hits: dict[str, list[bool]]) -> dict:
    by_type: dict[str, list[bool]] = defaultdict(list)
    true_by_kind: dict[str, list[bool]] = defaultdict(list)
    kind_of: dict[str, str] = {}
    for rec in records:
        facts, rec_hits = rec.get("facts"), hits.get(rec["id"])
        if not _option_facts(facts, rec_hits):
            continue
        for fact, hit in zip(facts, rec_hits):
            if fact["type"] == "true":
                true_by_kind[_option_kind(fact)].append(hit)
            else:
                by_type[fact["type"]].append(hit)
                kind_of[fact["type"]] = _option_kind(fact)
    return {t: {"recall": _mean(h), "n": len(h), "kind": kind_of[t], "specificity": _mean(true_by_kind[kind_of[t]]),
                "n_true": len(true_by_kind[kind_of[t]])} for t, h in _ordered(by_type, HALLUCINATION_TYPES)}


def _claim_scores(records: list[dict], hits: dict[str, list[bool]]) -> dict:
    groups: dict[str, dict[str, list[bool]]] = {"type": defaultdict(list), "hard": defaultdict(list)}
    for rec in records:
        facts, rec_hits = rec.get("facts"), hits.get(rec["id"])
        if _claim_facts(facts, rec_hits):
            groups["type"][facts["type"]].append(rec_hits[0])
            groups["hard"]["yes" if facts["hard"] else "no"].append(rec_hits[0])
    if not groups["type"]:
        return {}
    known = {"type": CLAIM_TYPES, "hard": ("yes", "no")}
    return {group: {name: {"accuracy": _mean(h), "n": len(h)} for name, h in _ordered(by_name, known[group])}
            for group, by_name in groups.items()}


def _option_kind(fact: dict) -> str:
    """What a Task-1 option asserts: `exists` (an object), `size` (an object's size: an existence fact with a
    size), `relation` or `count`."""
    if fact.get("kind") == "exists" and isinstance(fact.get("sel"), dict) and "size" in fact["sel"]:
        return "size"
    return str(fact.get("kind"))


def _option_facts(facts, hits: list[bool] | None) -> bool:
    """One fact dict with a `type` name per option, and a labelled decision for each."""
    return (isinstance(facts, list) and hits is not None and len(facts) == len(hits)
            and all(isinstance(f, dict) and isinstance(f.get("type"), str) for f in facts))


def _claim_facts(facts, hits: list[bool] | None) -> bool:
    return (isinstance(facts, dict) and isinstance(facts.get("type"), str) and isinstance(facts.get("hard"), bool)
            and hits is not None and len(hits) == 1)


def _ordered(groups: dict, known: tuple[str, ...]) -> list[tuple[str, object]]:
    """The benchmark's own order for the names it knows, then any others sorted."""
    return sorted(groups.items(), key=lambda kv: (known.index(kv[0]) if kv[0] in known else len(known), kv[0]))


def _mean(hits: list[bool]) -> float | None:
    return float(np.mean(hits)) if hits else None
