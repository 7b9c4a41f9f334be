"""Unlabelled inputs of the distillation stages: the objective's split between labelled and unlabelled positions,
their cache keys, ids, generated records, config keys and fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.config.schema import ConfigError, load_config, validate_raw
from orchestrator.run.fingerprints import fingerprints
from orchestrator.run.kinds import plan_stages
from orchestrator.run.stages import stage_loss
from orchestrator.run.unlabeled import ID_PREFIX, as_unlabeled, check_ids, generated_unlabeled, load_unlabeled, mixed, scene_key
from workers.data import synth
from workers.data.augment import AugmentConfig, aug_key
from workers.data.records import DataError
from workers.inference.logits import target_token_ids
from workers.losses import coupling_weights, cross_entropy, topk_forward_kl
from workers.training.objectives import StageObjective
from workers.models.prompts import record_units
from workers.teachers.outputs import TeacherOutput, from_wire, wire_outputs
from workers.teachers.requests import position_keys

QUICKSTART = "configs/quickstart.yaml"
LABEL_IDS = (3, 5)
V, K = 40, 8
TARGETS = torch.tensor([1, -1, 0, -1, 1, 0, -1])


def _logits_and_outs(n_teachers: int, temperature: float):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(TARGETS), V, generator=g, requires_grad=True)
    outs = [from_wire(wire_outputs(torch.randn(len(TARGETS), V, generator=g) * 3, LABEL_IDS, K, temperature))
            for _ in range(n_teachers)]
    return logits, outs


def _objective(kind: str, *over: str):
    cfg = load_config(QUICKSTART, ["data.synth.unlabeled=2", "tcrd.unlabeled_weight=0.3", *over])
    plan = next(p for p in plan_stages(cfg) if p.kind.name == kind and p.level == "S")
    loss = stage_loss(cfg, plan, {t.stage: "pool" for t in plan.teachers}, "/cache")
    return StageObjective(loss, LABEL_IDS), loss


def _rows(out: TeacherOutput, mask: torch.Tensor) -> TeacherOutput:
    return out.map(lambda v: v[mask])


def test_unlabelled_positions_never_reach_the_ce_term():
    objective, _ = _objective("direct")
    logits, _ = _logits_and_outs(0, 1.0)
    lab = TARGETS >= 0
    loss, terms = objective(logits, TARGETS, [])
    expected = cross_entropy(logits[lab], target_token_ids(TARGETS[lab], LABEL_IDS))
    assert torch.allclose(loss, expected) and terms["loss_ce"] == pytest.approx(expected.item())
    loss.backward()
    assert torch.all(logits.grad[~lab] == 0) and torch.any(logits.grad[lab] != 0)
    only_unlabelled, terms = objective(logits, torch.full_like(TARGETS, -1), [])
    assert only_unlabelled.item() == 0 and "loss_ce" not in terms


def test_tcrd_couples_labelled_positions_and_adds_an_uncoupled_kd_term_over_the_rest():
    objective, cfg = _objective("tcrd")
    logits, outs = _logits_and_outs(2, cfg.teachers[0].temperature)
    lab, unl = TARGETS >= 0, TARGETS < 0
    loss, terms = objective(logits, TARGETS, outs)
    expected = cfg.ce_weight * cross_entropy(logits[lab], target_token_ids(TARGETS[lab], LABEL_IDS))
    unlabelled = 0.0
    for t, out in zip(cfg.teachers, outs):
        o, u = _rows(out, lab), _rows(out, unl)
        w = coupling_weights(torch.softmax(o.label_logits, -1)[:, 0], TARGETS[lab], sharpness=cfg.sharpness)
        assert terms[f"coupling_{t.tag}"] == pytest.approx(w.mean().item())
        args = (o.topk_logprobs, o.topk_ids, o.tail_logprob)
        expected = expected + t.weight * topk_forward_kl(logits[lab], *args, temperature=t.temperature, weights=w)
        unlabelled = unlabelled + t.weight * topk_forward_kl(
            logits[unl], u.topk_logprobs, u.topk_ids, u.tail_logprob, temperature=t.temperature)
    assert cfg.unlabeled_weight == 0.3
    assert torch.allclose(loss, expected + 0.3 * unlabelled)
    assert terms["loss_unlabeled"] == pytest.approx(unlabelled.item()) and terms["unlabeled_positions"] == 3
    assert torch.isfinite(loss)


def test_pseudo_labels_are_ce_on_the_top_teachers_decision():
    objective, cfg = _objective("ppod", "data.unlabeled_use=pseudo_labels")
    assert [t.level for t in cfg.teachers] == ["M", "L"] and cfg.top_teacher == 1  # L, the pyramid's top
    logits, outs = _logits_and_outs(2, cfg.teachers[0].temperature)
    unl = TARGETS < 0
    _, terms = objective(logits, TARGETS, outs)
    top = outs[1].label_logits[unl]
    decision = (top[:, 0] >= top[:, 1]).long()
    ce = cross_entropy(logits[unl], target_token_ids(decision, LABEL_IDS))
    assert terms["loss_unlabeled"] == pytest.approx(ce.item())


def test_cache_keys_of_labelled_and_unlabelled_inputs_never_collide(records):
    """The worst case: the unlabelled inputs are the very training records, same ids and all."""
    unlabelled = [as_unlabeled(r, "u.jsonl") for r in records]
    check_ids(unlabelled, records)
    both = records + unlabelled
    keys = set()
    for augmenting in (False, True):
        for rec in both:
            (unit,) = record_units([rec])
            n = len(unit["targets"])
            key = aug_key(rec["id"], 0, 0, AugmentConfig()) if augmenting else ""
            batch = {"positions": torch.zeros(n, 2, dtype=torch.long), "slot": torch.arange(n),
                     "uid": [unit["uid"]], "aug_key": [key]}
            keys.update(position_keys(batch))
            assert (min(unit["targets"]) < 0) == rec["id"].startswith(ID_PREFIX)
    assert len(keys) == 2 * sum(len(u["targets"]) for u in record_units(both))


def test_ids_used_twice_are_refused(records):
    clash = [{**records[0], "id": ID_PREFIX + "x"}]
    with pytest.raises(ConfigError, match="unique"):
        check_ids([as_unlabeled({**records[1], "id": "x"}, "u.jsonl")], clash)
    with pytest.raises(ConfigError, match="u.jsonl"):
        check_ids([as_unlabeled(records[1], "u.jsonl")] * 2, [])


def test_unlabelled_spread_through_the_training_order():
    out = mixed(list(range(12)), ["a", "b", "c", "d"])
    assert sorted(map(str, out)) == sorted(map(str, list(range(12)) + ["a", "b", "c", "d"]))
    assert [sum(isinstance(x, str) for x in out[i:i + 4]) for i in range(0, 16, 4)] == [1, 1, 1, 1]


def test_generated_scenes_seen_in_val_or_test_are_dropped_and_counted(tmp_path, records):
    cfg = load_config(QUICKSTART, ["data.synth.unlabeled=5"])
    spec = synth.SynthSpec()
    fresh, dropped = generated_unlabeled(cfg, tmp_path, [], spec)
    assert dropped == 0 and len(fresh) == 10
    seen = json.loads(json.dumps(fresh[3][1]))
    seen["scene"]["objects"].reverse()  # the same scene, its objects listed in another order
    kept, dropped = generated_unlabeled(cfg, tmp_path, [seen, *records], spec)
    assert dropped == 1 and len(kept) == 9 and scene_key(fresh[3][1]) not in {scene_key(r) for _, r in kept}
    assert not {r["id"] for _, r in fresh} & {r["id"] for r in records}  # not train's stream


def test_files_reuse_the_loader_and_labels_are_ignored(tmp_path, bench_dir):
    src = (bench_dir / "factuality" / "val.jsonl").read_text().splitlines()
    image = str(bench_dir / "factuality" / json.loads(src[0])["image"])
    good = tmp_path / "u.jsonl"
    good.write_text("\n".join(json.dumps({**json.loads(line), "image": image}) for line in src[:2]) + "\n")
    cfg = load_config(QUICKSTART, [f"data.unlabeled=[{good}]", "data.synth.unlabeled=0"])
    recs, counts = load_unlabeled(cfg, tmp_path, {"train": [], "val": [], "test": []}, synth.SynthSpec())
    assert counts == {"records": 2, "dropped_overlap": 0}
    assert all(r["label"] is None and r["id"].startswith(ID_PREFIX) for r in recs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(src[0].replace('"image": "', '"image": "x') + "\n" + '{"id": 1}\n')
    with pytest.raises(DataError, match=f"{bad}:1: "):
        load_unlabeled(load_config(QUICKSTART, [f"data.unlabeled=[{bad}]", "data.synth.unlabeled=0"]), tmp_path,
                       {"train": [], "val": [], "test": []}, synth.SynthSpec())


@pytest.mark.parametrize("raw, message", [
    ({"ppod": {"unlabeled_weight": -1}}, "'ppod.unlabeled_weight': Input should be greater than or equal to 0"),
    ({"tcrd": {"unlabeled_weigth": 1}}, "did you mean 'unlabeled_weight'"),
    ({"data": {"synth": {"unlabeled": -2}}}, "'data.synth.unlabeled'"),
    ({"data": {"unlabeled": "u.jsonl"}}, "'data.unlabeled': Input should be a valid list"),
    ({"data": {"unlabeled_use": "soft"}}, "'data.unlabeled_use'"),
    ({"data": {"source": "files", "files": {"train": ["a"], "test": ["b"]}, "synth": {"unlabeled": 3}}},
     "data.synth.unlabeled generates benchmark scenes"),
])
def test_new_config_keys_are_validated(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_raw({"direct": {"levels": []}, **raw}, "f.yaml")


def test_fingerprints_change_for_distillation_stages_only():
    base = load_config(QUICKSTART, ["data.synth.unlabeled=0"])
    before = fingerprints(base, plan_stages(base))
    distilled = [n for n in before if "+" in n]
    for over in (["data.synth.unlabeled=4"], ["data.synth.unlabeled=0", "data.unlabeled=[u.jsonl]"]):
        cfg = load_config(QUICKSTART, over)
        after = fingerprints(cfg, plan_stages(cfg))
        assert [n for n in before if before[n] != after[n]] == distilled, over
        heavier = load_config(QUICKSTART, [*over, "ppod.unlabeled_weight=2"])
        again = fingerprints(heavier, plan_stages(heavier))
        assert [n for n in after if after[n] != again[n]] == distilled
        tcrd_only = load_config(QUICKSTART, [*over, "tcrd.unlabeled_weight=2"])
        last = fingerprints(tcrd_only, plan_stages(tcrd_only))
        assert [n for n in after if after[n] != last[n]] == ["S+PPOD+TCRD"]
    weight_alone = load_config(QUICKSTART, ["data.synth.unlabeled=0", "ppod.unlabeled_weight=2"])  # no unlabelled
    # inputs: nothing changes
    assert fingerprints(weight_alone, plan_stages(weight_alone)) == before
