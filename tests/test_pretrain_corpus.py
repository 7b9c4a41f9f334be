"""The tiny bases are pretrained on skills, never on the benchmark (issue 30): no benchmark phrase or judgement in a
large pretraining sample, no benchmark scene stream reused, one fixed tokenizer with every fixed word one token,
and supervision on the answers alone."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.bases import load_bases_config
from workers.models import prompts
from workers.data import synth
from workers.data import pretrain_corpus as pc
from workers.models.vocab import fixed_tokenizer, fixed_words

ROOT = Path(__file__).parent.parent
BASES = load_bases_config(ROOT / "configs" / "bases.yaml")
JUDGEMENTS = {"yes", "no", "true", "false", "correct", "wrong"}


def template_phrases(module) -> set[str]:
    """The fixed parts of a module's template strings (f-strings' constant pieces and module-level string
    constants), read from its source: every piece of two or more words, or one word with ':' or '?'."""
    tree = ast.parse(inspect.getsource(module))
    pieces: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            pieces += [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            pieces.append(node.value.value)
    out = set()
    for piece in pieces:
        for line in piece.split("\n"):
            text = line.strip()
            if len(text.split()) >= 2 or (text.strip(":?") and text[-1:] in (":", "?")):
                out.add(text)
    return out


def test_phrase_extraction_finds_the_benchmark_templates():
    """The extraction is not vacuous: it finds the prompt questions, the field names and the context sentences."""
    phrases = template_phrases(synth) | template_phrases(prompts)
    for expected in ("Is the claim true?", "Which phrases are hallucinated?", "Caption:", "Context:",
                     "object is called a", "after the photo was taken."):
        assert any(expected in p for p in phrases), expected


def test_no_benchmark_phrase_or_judgement_in_a_large_pretraining_sample():
    phrases = template_phrases(synth) | template_phrases(prompts)
    items = pc.dialogues(BASES.seed, 3000, BASES.spec(), BASES.train.questions)
    text = "\n".join(q + "\n" + a for d in items for q, a in d.turns)
    found = sorted(p for p in phrases if p in text)
    assert not found, f"benchmark phrases in the pretraining text: {found}"
    answers = {a.lower().strip(".") for d in items for _, a in d.turns}
    assert not answers & JUDGEMENTS
    kinds = {fn.__name__ for fn in pc.QUESTIONS}
    assert len(kinds) >= 8 and len(answers) > 50  # every kind of question, with varied answers


def _key(scene: dict) -> frozenset:
    return frozenset((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in scene["objects"])


def test_pretraining_scenes_come_from_their_own_stream():
    """A pretraining scene equals a benchmark scene of the same seed only by chance. On a 3 x 3 grid there are
    just 432 one-object scenes, so equal scenes must occur; but three-object scenes (8.2M possible) coincide
    about 0.03 times per split here, and some 200 times (every one) were a split's own stream reused."""
    spec = BASES.spec()
    ours = {_key(d.scene) for d in pc.dialogues(BASES.seed, 4000, spec, questions=0)}
    ours = {k for k in ours if len(k) == 3}

    def split_scenes(task: str, split: str) -> set:
        rng = synth.random.Random(f"{BASES.seed}/{task}/{split}")
        return {k for k in (_key(ex["scene"]) for ex in synth._examples(task, rng, 600, spec)) if len(k) == 3}

    for task in synth.TASKS:
        for split in synth.SPLITS + ("unlabeled",):
            assert len(ours & split_scenes(task, split)) <= 2, (task, split)
    assert len(ours & {k for k in map(_key, synth.random_scenes(BASES.seed, 4000, spec)) if len(k) == 3}) <= 2


def test_every_fixed_word_is_one_token_of_the_shipped_tokenizer():
    from transformers import PreTrainedTokenizerFast

    shipped = ROOT / BASES.out
    tok = PreTrainedTokenizerFast.from_pretrained(shipped / "S")
    words = fixed_words(BASES.seed, BASES.spec())
    assert {"Context", "Caption", "hallucinated", "claim", "zib", "Describe", "lies"} <= set(words)
    for w in words:
        assert len(tok.encode(" " + w, add_special_tokens=False)) == 1, w
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    for role in ("user", "assistant", "system", "yes", "no"):
        assert len(tok.encode(role, add_special_tokens=False)) == 1, role
    for level in BASES.levels:  # one tokenizer for the whole pyramid: the one tiny levels built from config get
        assert (shipped / level / "tokenizer.json").read_bytes() == (shipped / "S" / "tokenizer.json").read_bytes()
    assert tok.get_vocab() == fixed_tokenizer(BASES.vocab_size).get_vocab()


def test_only_answers_are_supervised():
    from workers.models.families import FAMILIES
    from workers.models.model_dirs import CHAT_TEMPLATE
    from workers.training.pretrain import encode_dialogues

    spec = BASES.spec()
    tok = fixed_tokenizer(BASES.vocab_size, BASES.seed, spec)
    processor = FAMILIES["qwen2_5_vl"].build_processor(tok, BASES.image_size, CHAT_TEMPLATE)
    items = pc.dialogues(7, 3, spec, questions=4)
    enc = encode_dialogues(items, processor)
    for d, ids, labels in zip(items, enc["input_ids"], enc["labels"]):
        seen = labels != -100
        supervised = tok.decode(ids[seen])
        assert supervised == "".join(a + "<|im_end|>" for _, a in d.turns)
        assert not np.any(ids[seen] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_cards_state_the_same_schedule_for_every_level():
    """No base is handicapped: every level saw the same stream for the same steps, and each card says so."""
    cards = {lv: json.loads((ROOT / BASES.out / lv / "card.json").read_text()) for lv in BASES.levels}
    assert {c["steps"] for c in cards.values()} == {BASES.train.steps}
    assert {c["seed_stream"] for c in cards.values()} == {f"pretrain/{BASES.seed}/item/<i>"}
    params = {lv: c["params"] for lv, c in cards.items()}
    assert params["S"] * 10 <= params["L"] and params["S"] < params["M"] < params["L"]
    assert all(c["shape"]["layers"] >= 2 for c in cards.values())
    size = sum(f.stat().st_size for f in (ROOT / BASES.out).rglob("*") if f.is_file())
    assert size <= 20 << 20


@pytest.mark.parametrize("level", sorted(BASES.levels))
def test_card_weights_hash_matches_the_weights(level):
    from workers.models.identity import weights_hash

    card = json.loads((ROOT / BASES.out / level / "card.json").read_text())
    assert card["weights_sha256"] == weights_hash(ROOT / BASES.out / level)


def test_fingerprints_cover_the_base_weights_and_the_prompt_format(tmp_path, monkeypatch):
    """A rebuilt base or a moved decision position never reuses old stages."""
    import shutil

    from orchestrator.run import fingerprints as stages
    from orchestrator.config.schema import load_config
    from orchestrator.run.fingerprints import fingerprints
    from orchestrator.run.kinds import plan_stages

    base = tmp_path / "S"
    shutil.copytree(ROOT / BASES.out / "S", base)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"levels:\n  S: {{path: {base}}}\ndirect: {{levels: [S]}}\nppod: {{enabled: false}}\n"
                        "tcrd: {enabled: false}\n")
    cfg = load_config(cfg_path)
    before = fingerprints(cfg, plan_stages(cfg))["S-direct"]
    assert fingerprints(cfg, plan_stages(cfg))["S-direct"] == before
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rebuilt = fingerprints(cfg, plan_stages(cfg))["S-direct"]
    assert rebuilt != before
    monkeypatch.setattr(stages, "PROMPT_FORMAT_VERSION", stages.PROMPT_FORMAT_VERSION + 1)
    assert fingerprints(cfg, plan_stages(cfg))["S-direct"] not in (before, rebuilt)


@pytest.mark.slow
def test_hkd_pretrain_writes_loadable_bases_with_cards(tmp_path):
    """`hkd pretrain` end to end on a shrunk config: fp16 model dirs the product loads, each with its card."""
    import subprocess
    import sys

    import torch
    import yaml

    from workers.models.model_dirs import load_model_dir

    raw = yaml.safe_load((ROOT / "configs" / "bases.yaml").read_text())
    raw.update(out=str(tmp_path / "bases"), train={"steps": 3, "batch_size": 2, "eval_every": 2, "questions": 2},
               levels={"S": raw["levels"]["S"]})
    cfg = tmp_path / "bases.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pretrain", str(cfg), "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "bases" / "S"
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 3 and card["final_held_out_loss"] > 0 and (out / "loss_curve.png").stat().st_size > 0
    assert "hkd pretrain" in (out / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model, processor = load_model_dir(out)
    assert processor.tokenizer.get_vocab() == fixed_tokenizer(BASES.vocab_size).get_vocab()


def test_bad_bases_config_names_the_key(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "bases.yaml"
    cfg.write_text("out: x\nlevels: {S: {hiden: 64}}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pretrain", str(cfg)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "levels.S.hiden" in proc.stderr
