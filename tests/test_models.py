"""The offline pyramid: save → reload gives identical logits; tokenizer sharing is enforced."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.data import synth
from workers.models.model_dirs import (LABEL_WORDS, ModelDirError, build_tokenizer, check_same_tokenizer, label_word_ids,
                            load_model_dir, save_model_dir)
from workers.models.prompts import collate_records, encode_records, model_inputs, record_units
from workers.inference.logits import position_logits, positive_prob


def _batch(model_dir, records):
    model, processor = load_model_dir(model_dir)
    units = record_units(records[:4])
    batch = collate_records(encode_records(units, processor), processor.tokenizer.pad_token_id,
                            model.config.image_token_id)
    return model, processor, batch


def test_save_reload_identical_logits(tiny_model_dir, records, tmp_path):
    model, processor, batch = _batch(tiny_model_dir, records)
    with torch.no_grad():
        before = position_logits(model.eval(), batch)
    save_model_dir(model, processor, tmp_path / "copy")
    reloaded, processor2 = load_model_dir(tmp_path / "copy")
    with torch.no_grad():
        after = position_logits(reloaded.eval(), batch)
    assert torch.equal(before, after)
    assert len(processor2.tokenizer) == len(processor.tokenizer)
    assert not (tmp_path / "copy.tmp").exists()


def test_prompt_ends_at_assistant_turn_and_images_are_tokens(tiny_model_dir, records):
    model, processor, batch = _batch(tiny_model_dir, records)
    text = processor.tokenizer.decode(batch["input_ids"][0])  # a Task 1 record: its options in the answer turn
    assert "<|im_start|>assistant\n<|object_ref_start|>" in text and text.endswith("<|object_ref_end|>")
    # 112 px → 8×8 patches → 4×4 merged vision tokens per image.
    assert int(batch["mm_token_type_ids"][0].sum()) == 16
    assert batch["pixel_values"].shape[0] == 64 * len(batch["input_ids"])
    probs = positive_prob(position_logits(model, batch), label_word_ids(processor.tokenizer))
    assert ((probs > 0) & (probs < 1)).all()
    assert set(model_inputs(batch)) <= set(batch)


def test_label_words_are_single_tokens(tokenizer):
    pos, neg = label_word_ids(tokenizer)
    assert pos != neg
    assert tokenizer.decode([pos]) == LABEL_WORDS[0] and tokenizer.decode([neg]) == LABEL_WORDS[1]


def test_tokenizer_mismatch_is_refused(tokenizer):
    other = build_tokenizer(synth.sample_texts(20, seed=3), vocab_size=600)
    with pytest.raises(ValueError, match="tokenizer mismatch: teacher has 512 tokens, student has 600"):
        check_same_tokenizer(tokenizer, other)
    check_same_tokenizer(tokenizer, tokenizer)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_model_dir_missing_files_is_refused(tiny_model_dir, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / missing).unlink()
    with pytest.raises(ModelDirError, match=re.escape(f"{broken}: not a complete model dir ({missing} missing)")):
        load_model_dir(broken)


def test_sharded_model_dir_missing_a_shard_is_refused(tiny_model_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelDirError, match="model-00002-of-00002.safetensors missing"):
        load_model_dir(sharded)


FULL_DISK_SAVE = """
import resource, signal, sys
from workers.models.model_dirs import load_model_dir, save_model_dir
model, processor = load_model_dir(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    save_model_dir(model, processor, sys.argv[2])
except Exception as err:  # safetensors reports I/O errors as its own type
    sys.exit(f"refused: {err}")
"""


def test_save_on_full_storage_leaves_previous_dir_and_no_partial(tiny_model_dir, tmp_path):
    """Storage that runs out while a model dir is written (the writer process may write at most 64 KiB per
    file): the save fails, removes its partial temporary dir, and the complete dir of the same name that was
    there before is untouched."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    before = _files(out)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(tiny_model_dir), str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "File too large" in proc.stderr.split("refused: ")[-1], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert _files(out) == before


def _files(root: Path) -> dict[str, bytes]:
    """Every file under a model dir (it may hold `logs/` from an `hkd evaluate` on it) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
