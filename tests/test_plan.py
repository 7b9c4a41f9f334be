"""`hkd plan` on the real Qwen2.5-VL and Qwen3-VL configs with no weights: meta-device models from mirrored config.json
files, one shared tokenizer across padded vocabularies, memory per GPU share, placement against cluster.yaml."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config.schema import load_config
from orchestrator.plan import format_table, plan_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "qwen2_5_vl.yaml"
MIRRORS = ROOT / "configs" / "qwen2_5_vl"
# Parameter counts Hugging Face lists for the released checkpoints.
PUBLISHED = {"L": 33.5e9, "M": 8.29e9, "S": 3.75e9}


def test_qwen_pyramid_plan_fits():
    rows, problems = plan_run(load_config(CONFIG), [MIRRORS], ROOT / "cluster.yaml")
    assert problems == []
    table = format_table(rows, 141)
    assert "teacher M ×2" in table and "train S+PPOD+TCRD ×8" in table
    by_process = {r["process"].split(" ×")[0]: r for r in rows}
    for process, level in (("train L-direct", "L"), ("train M+PPOD", "M"), ("train S-direct", "S")):
        assert by_process[process]["params"] == pytest.approx(PUBLISHED[level], rel=0.01)
    # 3B pads its embedding table to 151,936 rows, 7B/32B to 152,064: one tokenizer all the same.
    assert by_process["train S-direct"]["rows"] == 151_936 and by_process["train L-direct"]["rows"] == 152_064
    lora = by_process["train M+PPOD"]
    assert 0 < lora["trainable"] < 0.01 * lora["params"]  # LoRA r=16 on q,k,v,o
    assert by_process["teacher M"]["need_gb"] <= by_process["teacher M"]["limit_gb"]


# Each mirrored pyramid (configs/<family>.yaml over configs/<family>/, SOURCES.md there): the sizes Hugging Face
# publishes for L, M and S, and the embedding rows of its one tokenizer.
MIRRORED = [("qwen3_vl", (33.4e9, 8.77e9, 2.13e9), 151_936), ("gemma3", (27.4e9, 12.2e9, 4.3e9), 262_208),
            ("smolvlm", (2.25e9, 507e6, 256e6), 49_280), ("internvl", (38.4e9, 7.94e9, 0.938e9), 151_674)]


@pytest.mark.parametrize("family, published, rows", MIRRORED)
def test_mirrored_pyramid_plan_fits(family, published, rows):
    """Every process fits its GPU share and the placement fits cluster.yaml; the meta-device builds have the
    published sizes; one tokenizer, so every pair distils over top-k + tail."""
    planned, problems = plan_run(load_config(ROOT / "configs" / f"{family}.yaml"), [ROOT / "configs" / family],
                                 ROOT / "cluster.yaml")
    assert problems == []
    by_process = {r["process"].split(" ×")[0]: r for r in planned}
    for process, size in zip(("train L-direct", "train M+PPOD", "train S-direct"), published):
        assert by_process[process]["params"] == pytest.approx(size, rel=0.01), process
    assert {r["rows"] for r in planned} == {rows}
    assert by_process["train M+PPOD"]["kd"] == "top-64 + tail (L)"


def test_smolvlm_v1_files_build_the_same_models_under_idefics3s_classes():
    v1 = load_config(ROOT / "configs" / "smolvlm.yaml", ["levels.M.path=HuggingFaceTB/SmolVLM-500M-Instruct",
                                                         "levels.S.path=HuggingFaceTB/SmolVLM-256M-Instruct"])
    rows_v1, problems_v1 = plan_run(v1, [ROOT / "configs" / "smolvlm"])
    rows, _ = plan_run(load_config(ROOT / "configs" / "smolvlm.yaml"), [ROOT / "configs" / "smolvlm"])
    assert problems_v1 == [] and [r["params"] for r in rows_v1] == [r["params"] for r in rows]


def test_a_pyramid_of_two_families_distils_over_the_label_words_where_tokenizers_differ():
    """InternVL3-38B teaching Gemma 3 4B (two tokenizers: label words) and InternVL3-8B (one: top-k), each
    checkpoint's tokenizer facts from its own mirror dir."""
    cfg = load_config(ROOT / "configs" / "internvl.yaml", ["levels.S.path=google/gemma-3-4b-it"])
    rows, problems = plan_run(cfg, [ROOT / "configs" / "internvl", ROOT / "configs" / "gemma3"])
    assert problems == []
    kd = {r["process"].split(" ×")[0]: r["kd"] for r in rows}
    assert kd["train M+PPOD"] == "top-64 + tail (L)"
    assert kd["train S+PPOD"] == "label words (M), label words (L)"


def test_internvl3_14b_as_m_needs_half_a_gpu_per_teacher_replica():
    cfg = load_config(ROOT / "configs" / "internvl.yaml", ["levels.M.path=OpenGVLab/InternVL3-14B-hf"])
    _, problems = plan_run(cfg, [ROOT / "configs" / "internvl"])
    assert problems == ["teacher M ×2: needs 30.2 GB, its GPU share allows 30.0 GB"]


@pytest.mark.parametrize("family, appended", [("qwen2_5_vl", 0), ("idefics3", 4), ("smolvlm", 4), ("gemma3", 3),
                                             ("internvl", 4)])
def test_tiny_level_planned_with_its_familys_own_tokenizer(family, appended):
    """A family that appends its image tokens to the shared tokenizer is planned with them: the tokenizer check
    compares what each level's processor will really hold."""
    from orchestrator.plan import _level, _tiny_tokenizer

    shape = "{family: %s, hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, " \
            "vision_depth: 1, vision_heads: 2}" % family
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"levels={{S: {shape}}}", "direct.levels=[S]",
                                                             "ppod.enabled=false", "tcrd.enabled=false"])
    level = _level(cfg, "S", None)
    assert level.tokenizer[0] == len(_tiny_tokenizer(cfg.vocab_size)) + appended <= level.rows


def test_plan_names_what_does_not_fit(tmp_path, capsys):
    mirrors = tmp_path / "mirrors"
    shutil.copytree(MIRRORS, mirrors)
    small = mirrors / "Qwen2.5-VL-3B-Instruct.json"
    small.write_text(json.dumps({**json.loads(small.read_text()), "vocab_size": 151_000}))
    rc = main(["plan", str(CONFIG), "--model-configs", str(mirrors), "--cluster", str(ROOT / "cluster.yaml"),
               "--set", "levels.L.path=Qwen/Qwen2.5-VL-72B-Instruct", "--set", "resources.num_workers=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "qwen2_5_vl.yaml: the plan does not fit" in err
    assert "levels.S: 151000 embedding rows for a tokenizer of 151665 tokens" in err
    assert "teacher L ×2: needs 146.8 GB, its GPU share allows 119.8 GB" in err
    assert "placement.student.student: 32 processes need 32, " in err
