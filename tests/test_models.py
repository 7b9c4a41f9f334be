"""The offline pyramid: save → reload gives identical logits; tokenizer sharing is enforced."""

from __future__ import annotations

import pytest
import torch

from workers import synth
from workers.models import (LABEL_WORDS, build_tokenizer, check_same_tokenizer, label_word_ids,
                            load_model_dir, save_model_dir)
from workers.prompts import collate, encode_units, expand_units, model_inputs
from workers.train_loop import answer_logits, positive_prob


def _batch(model_dir, records):
    model, processor = load_model_dir(model_dir)
    units = expand_units(records[:4])
    batch = collate(encode_units(units, processor), processor.tokenizer.pad_token_id, model.config.image_token_id)
    return model, processor, batch


def test_save_reload_identical_logits(tiny_model_dir, records, tmp_path):
    model, processor, batch = _batch(tiny_model_dir, records)
    with torch.no_grad():
        before = answer_logits(model.eval(), batch)
    save_model_dir(model, processor, tmp_path / "copy")
    reloaded, processor2 = load_model_dir(tmp_path / "copy")
    with torch.no_grad():
        after = answer_logits(reloaded.eval(), batch)
    assert torch.equal(before, after)
    assert len(processor2.tokenizer) == len(processor.tokenizer)
    assert not (tmp_path / "copy.tmp").exists()


def test_prompt_ends_at_assistant_turn_and_images_are_tokens(tiny_model_dir, records):
    model, processor, batch = _batch(tiny_model_dir, records)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n")
    # 112 px → 8×8 patches → 4×4 merged vision tokens per image.
    assert int(batch["mm_token_type_ids"][0].sum()) == 16
    assert batch["pixel_values"].shape[0] == 64 * len(batch["input_ids"])
    probs = positive_prob(answer_logits(model, batch), label_word_ids(processor.tokenizer))
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


def test_model_dir_missing_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_model_dir(tmp_path / "empty")
