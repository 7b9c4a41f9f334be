"""Distillation across tokenizers (`orchestrator.run.pairs`): a teacher whose tokenizer differs from its student's
distils over the answer distribution on the two label words, each side scoring them with its own ids; its
inputs are its own encoding of the same records; the wire and the cache carry its label-word logits alone.
Through Ray Train: a tiny Qwen3-VL teacher distils into a tiny SmolVLM student, in one pyramid of all five
families."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
import yaml

from orchestrator.cli import main
from orchestrator.config.schema import ConfigError, RunConfig
from orchestrator.run.pairs import RunInputs, check_pairs, level_inputs
from orchestrator.run.stages import default_stage_loss
from orchestrator.run.kinds import plan_stages
from tests.test_families import SHAPE, tiny
from workers.models.families import family_of
from workers.data import synth
from workers.data.records import load_jsonl
from workers.losses import forward_kl, jsd, reverse_kl
from workers.models.model_dirs import LevelShape, build_level
from workers.training.objectives import kd_divergence
from workers.models.prompts import collate_records, encode_with, prefixed, record_units
from workers.contract import OutputKind
from workers.teachers.outputs import TeacherOutput, wire_outputs
from workers.teachers.cache import TeacherCache, merge
from workers.teachers.requests import teacher_batch


def test_label_word_kd_is_the_divergence_of_the_two_answer_distributions():
    """KD from a label-word teacher = the stage's divergence between softmax(teacher label logits / T) and the
    student's softmax over its own label-word ids / T, times T²: zero when they agree, whatever the rest of the
    student's vocabulary; its gradient reaches only the student's two label-word logits."""
    torch.manual_seed(0)
    student_ids, T = (7, 3), 2.0
    logits = torch.randn(5, 40, requires_grad=True)
    teacher = TeacherOutput(OutputKind.LABEL_WORDS, torch.randn(5, 2))
    pair = logits[:, list(student_ids)]
    for kd_loss, reference in (("forward_kl", forward_kl(pair, teacher.label_logits, T)),
                               ("reverse_kl", reverse_kl(pair, teacher.label_logits, T)),
                               ("jsd", jsd(pair, teacher.label_logits, 0.3, T))):
        got = kd_divergence(logits, teacher, T, default_stage_loss(kd_loss=kd_loss, beta=0.3), student_ids)
        torch.testing.assert_close(got, reference)
    p = torch.softmax(teacher.label_logits / T, -1)
    q = torch.softmax(pair / T, -1)
    by_hand = T**2 * (p * (p.log() - q.log())).sum(-1).mean()
    kd = kd_divergence(logits, teacher, T, default_stage_loss(), student_ids)
    torch.testing.assert_close(kd, by_hand)
    kd.backward()
    touched = logits.grad.abs().sum(0).nonzero().flatten().tolist()
    assert sorted(touched) == sorted(student_ids)
    agreeing = TeacherOutput(OutputKind.LABEL_WORDS, pair.detach() + 1.5)  # a shift: the same distribution
    assert kd_divergence(logits, agreeing, T, default_stage_loss(), student_ids).item() == pytest.approx(0, abs=1e-6)


def test_teacher_sends_and_cache_keeps_label_word_logits_alone(tmp_path):
    logits = torch.randn(6, 50)
    full, labels_only = wire_outputs(logits, (4, 9), 8, 2.0), wire_outputs(logits, (4, 9), 0, 2.0)
    assert set(labels_only) == {"label_logits"} and set(full) > {"label_logits"}
    np.testing.assert_array_equal(labels_only["label_logits"], full["label_logits"])
    np.testing.assert_array_equal(labels_only["label_logits"], logits[:, [4, 9]].numpy())
    cache = TeacherCache(str(tmp_path), "teacher", 0, 2.0, 1 << 30)
    keys = [f"r{i}#0|" for i in range(6)]
    cache.put(keys, labels_only)
    (shard,) = (tmp_path / "teacher" / "k0-T2.0").glob("*.arrow")
    assert _columns(shard) == ("key", "label_logits")
    again = TeacherCache(str(tmp_path), "teacher", 0, 2.0, 1 << 30)
    found = again.get(keys)
    np.testing.assert_array_equal(merge(found, None, again.fields)["label_logits"], labels_only["label_logits"])


@pytest.fixture(scope="module")
def two_families(tmp_path_factory, tokenizer) -> dict:
    """A tiny Qwen3-VL level and a tiny SmolVLM one over the session's tokenizer (SmolVLM appends its image
    tokens: two tokenizers, the label words at the same ids), and records to encode."""
    tmp = tmp_path_factory.mktemp("two")
    dirs = {lv: build_level(tmp / lv, LevelShape(family=fam, **SHAPE), tokenizer, image_size=56)
            for lv, fam in (("L", "qwen3_vl"), ("S", "smolvlm"))}
    synth.generate(tmp / "data", seed=0, n_train=4, n_val=2, n_test=2)
    units = record_units([r for t in synth.TASKS for r in load_jsonl(tmp / "data" / t / "train.jsonl")])
    return {"dirs": dirs, "units": units, "tmp": tmp}


def _config(extra: str = "") -> RunConfig:
    return RunConfig.model_validate(yaml.safe_load(f"""
name: pairs
levels: {{L: {tiny("qwen3_vl")}, M: {tiny("qwen3_vl")}, S: {tiny("smolvlm")}}}
direct: {{levels: [L, M]}}
ppod: {{enabled: true, stages: [{{student: S, teachers: [{{level: M}}, {{level: L}}]}}] {extra}}}
tcrd: {{enabled: false}}
"""))


def test_each_pair_gets_the_kd_its_tokenizers_allow():
    cfg = _config()
    plans = plan_stages(cfg)
    qwen, smol = (512, (300, 301)), (516, (300, 301))
    assert check_pairs(cfg, plans, {"L": qwen, "M": qwen, "S": smol}) == {
        "M-direct→S+PPOD": "label_words", "L-direct→S+PPOD": "label_words"}
    assert check_pairs(cfg, plans, {"L": qwen, "M": qwen, "S": qwen}) == {
        "M-direct→S+PPOD": "top_k", "L-direct→S+PPOD": "top_k"}
    forced = _config(", kd_over: label_words")
    assert set(check_pairs(forced, plan_stages(forced), {"L": qwen, "M": qwen, "S": qwen}).values()) == {"label_words"}
    top_k = _config(", kd_over: top_k")
    with pytest.raises(ConfigError, match=r"ppod.kd_over: top_k needs one shared tokenizer, but levels.M \(teacher "
                                          r"of S\+PPOD\) has 512 tokens .* levels.S 516 tokens .*label-word KD"):
        check_pairs(top_k, plan_stages(top_k), {"L": qwen, "M": qwen, "S": smol})


def test_levels_of_two_families_read_their_own_encodings_of_the_same_records(two_families):
    """Each split is encoded once per processor in the same rows; the teacher's batch of its own encoding has the
    student's records and one supervised position per option or claim in the same order."""
    dirs, units = two_families["dirs"], two_families["units"]
    cfg = RunConfig.model_validate(yaml.safe_load(f"""
name: two
levels: {{L: {{path: '{dirs["L"]}'}}, S: {{path: '{dirs["S"]}'}}}}
direct: {{levels: [L]}}
ppod: {{enabled: true, stages: [{{student: S, teachers: [{{level: L}}]}}]}}
tcrd: {{enabled: false}}
"""))
    plans = plan_stages(cfg)
    inputs = RunInputs(cfg, plans, dirs, first="L")
    assert inputs.prefixes == {"L": "", "S": "S:"} and set(inputs.also) == {"S:"}
    assert inputs.kinds == {"L-direct→S+PPOD": "label_words"}
    ((label_words, own),) = inputs.stage_teachers(plans[-1]).values()
    assert label_words and own.prefix == ""  # the student S reads "S:", its teacher L the unprefixed columns
    columns = encode_with(units, inputs.processor, inputs.also)
    student_inputs = inputs.levels["S"]
    student = collate_records(prefixed(columns, "S:"), student_inputs.pad_id, student_inputs.image_token_id)
    teacher = collate_records(prefixed(columns, ""), inputs.levels["L"].pad_id, inputs.levels["L"].image_token_id)
    assert "pixel_attention_mask" in student and "image_grid_thw" in teacher  # each its own family's format
    spec = default_stage_loss([{"stage": "L-direct", "pool": "p", "label_words": True, "inputs": own}]).teachers[0]
    assert teacher_batch({**student, "teacher_inputs": {"": teacher}}, spec) is teacher
    assert student["uid"] == teacher["uid"] and torch.equal(student["slot"], teacher["slot"])
    shifted = {**teacher, "positions": teacher["positions"].flip(0)}
    with pytest.raises(ValueError, match="other records or positions"):
        teacher_batch({**student, "teacher_inputs": {"": shifted}}, spec)


def test_label_word_that_is_not_one_token_refused_naming_level_and_word(two_families, tmp_path):
    """A level whose tokenizer splits "yes" is refused before any work (here: its merge rules for "yes" removed)."""
    import shutil

    broken = tmp_path / "S"
    shutil.copytree(two_families["dirs"]["S"], broken)
    tok = json.loads((broken / "tokenizer.json").read_text())
    merges = tok["model"]["merges"]
    tok["model"]["merges"] = [m for m in merges if "".join(m if isinstance(m, list) else m.split(" ")) != "yes"]
    assert len(tok["model"]["merges"]) < len(merges)
    (broken / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"levels.S: label word 'yes' is not one token in its tokenizer"):
        level_inputs({"L": two_families["dirs"]["L"], "S": broken}, {"L": False, "S": False})


# Every family in one run, each level distilled from the one above: tokenizers differ where a family appends other
# image tokens (label-word KD), SmolVLM's and Idefics3's are one (top-k KD, each reading its own encoding).
CHAIN = (("Q", "qwen3_vl"), ("S", "smolvlm"), ("D", "idefics3"), ("G", "gemma3"), ("I", "internvl"))
CHAIN_CONFIG = f"""
name: chain
vocab_size: 1024
data: {{source: synth, synth: {{train: 6, val: 2, test: 2, image_size: 56, max_objects: 3}}}}
levels: {{{", ".join(f"{lv}: {tiny(fam)}" for lv, fam in CHAIN)}}}
direct: {{levels: [Q], train: {{epochs: 1, batch_size: 4, log_every: 1}}}}
ppod:
  enabled: true
  temperature: 1.0
  ce_weight: 0.0
  stages: [{", ".join(f"{{student: {s}, teachers: [{{level: {t}}}]}}" for (t, _), (s, _) in zip(CHAIN, CHAIN[1:]))}]
  train: {{epochs: 3, batch_size: 4, lr: 3.0e-3, log_every: 1}}
tcrd: {{enabled: false}}
teachers: {{k: 8, num_cpus: 0.5}}
cache: {{enabled: true}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
"""


@pytest.mark.slow
def test_every_family_distils_into_the_next_through_ray_then_evaluates_and_predicts(tmp_path, capsys):
    """Direct tuning of a tiny Qwen3-VL, then PPOD level by level into SmolVLM, Idefics3, Gemma 3 and InternVL
    students, each stage through Ray Train with the level above in a teacher actor; then `hkd evaluate` and
    `hkd predict` on every family's model.

    Across tokenizers (Qwen3-VL → SmolVLM): the KD term is finite and falls over the stage (pure KD,
    ce_weight 0, the same batches each epoch) and the teacher's answers, on the wire and in the cache, are its two
    label-word logits per position. SmolVLM → Idefics3 share a tokenizer: top-k + tail, each on its own encoding.
    `hkd plan` says which KD each pair gets."""
    config = tmp_path / "chain.yaml"
    config.write_text(CHAIN_CONFIG)
    assert main(["plan", str(config)]) == 0
    plan = capsys.readouterr().out
    for stage, kd in (("S+PPOD", "label words (Q)"), ("D+PPOD", "top-8 + tail (S)"), ("G+PPOD", "label words (D)"),
                      ("I+PPOD", "label words (G)")):
        assert any(line.startswith(f"train {stage}") and line.endswith(kd) for line in plan.splitlines()), plan
    run_dir = tmp_path / "runs" / "chain"
    try:
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
    finally:
        ray.shutdown()
    assert ("KD over the label words (kd_over: label_words, or tokenizers that differ): Q-direct→S+PPOD, "
            "D+PPOD→G+PPOD, G+PPOD→I+PPOD") in capsys.readouterr().out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    (stage,) = client.search_runs([client.get_experiment_by_name("hkd4vlm").experiment_id],
                                  "attributes.run_name = 'S+PPOD'")
    kd = [m.value for m in sorted(client.get_metric_history(stage.info.run_id, "loss_kd_Q-direct"),
                                  key=lambda m: m.step)]
    per_epoch = len(kd) // 3
    assert len(kd) == 3 * per_epoch >= 3 and all(math.isfinite(v) for v in kd)
    assert np.mean(kd[-per_epoch:]) < np.mean(kd[:per_epoch]), kd
    namespaces = sorted((p.name, _columns(next(p.glob("*.arrow")))) for p in (run_dir / "teacher_cache").glob("*/*"))
    assert namespaces == [("k0-T1.0", ("key", "label_logits"))] * 3 + [
        ("k8-T1.0", ("key", "topk_logprobs", "topk_ids", "tail_logprob", "label_logits"))]

    test_files = [str(run_dir / "data" / t / "test.jsonl") for t in synth.TASKS]
    for (level, family), stage_name in zip(CHAIN, ["Q-direct"] + [f"{lv}+PPOD" for lv, _ in CHAIN[1:]]):
        model = run_dir / "models" / stage_name.removesuffix("-direct")
        assert family_of(model).name == family
        if stage_name != "Q-direct":
            distilled = json.loads((run_dir / "stages" / f"{stage_name}.json").read_text())
            assert distilled["val"]["teacher/calls"] >= 1, stage_name  # the actor answered
        capsys.readouterr()
        assert main(["evaluate", str(model), *test_files, "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["task"] for r in rows] == list(synth.TASKS) and all(0 <= r["f1"] <= 1 for r in rows), family
        preds = tmp_path / f"{family}.jsonl"
        assert main(["predict", str(model), test_files[1], "--out", str(preds)]) == 0
        assert len(preds.read_text().splitlines()) == len(load_jsonl(test_files[1]))


def _columns(shard) -> tuple[str, ...]:
    return tuple(pa.ipc.open_file(pa.OSFile(str(shard))).read_all().column_names)
