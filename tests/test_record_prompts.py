"""One forward per record: a Task 1 record's options are scored in one sequence, one supervised position each,
and no label reaches the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Idefics3Processor, PreTrainedTokenizerFast

from workers.models.families.idefics3 import image_processor
from workers.models.model_dirs import label_word_ids, load_model_dir
from workers.inference.logits import position_logits
from workers.models.prompts import OPTION_CLOSE, collate_records, encode_records, record_units


def _encode(records, tiny_model_dir):
    model, processor = load_model_dir(tiny_model_dir)
    return model, processor, encode_records(record_units(records), processor)


def test_n_options_give_n_positions_each_at_an_option_close(records, tiny_model_dir):
    _, processor, enc = _encode(records, tiny_model_dir)
    close_id = processor.tokenizer.convert_tokens_to_ids(OPTION_CLOSE)
    for rec, ids, pos, targets in zip(records, enc["input_ids"], enc["positions"], enc["targets"]):
        n = len(rec["options"]) if rec["task"] == "hallucination" else 1
        assert len(pos) == len(targets) == n
        if rec["task"] == "hallucination":
            assert (ids[pos] == close_id).all()
            assert targets.tolist() == [int(v) for v in rec["hallucinated"]]
        else:
            assert pos.tolist() == [len(ids) - 1] and targets.tolist() == [int(rec["label"])]


def test_changing_one_gold_label_changes_no_input_token(records, tiny_model_dir):
    rec = next(r for r in records if r["task"] == "hallucination" and len(r["options"]) >= 2)
    flipped = {**rec, "hallucinated": [not rec["hallucinated"][0], *rec["hallucinated"][1:]]}
    unlabelled = {k: v for k, v in rec.items() if k != "hallucinated"}
    _, _, enc = _encode([rec, flipped, unlabelled], tiny_model_dir)
    assert all(np.array_equal(enc["input_ids"][0], ids) for ids in enc["input_ids"][1:])
    assert enc["targets"][0][0] != enc["targets"][1][0]
    assert (enc["targets"][2] == -1).all()


def test_position_logits_equal_the_full_forward_at_each_position_under_left_padding(records, tiny_model_dir):
    model, processor, enc = _encode(records[:6], tiny_model_dir)
    model.eval()
    batch = collate_records(enc, processor.tokenizer.pad_token_id, model.config.image_token_id)
    assert batch["positions"].shape == (sum(len(t) for t in enc["targets"]), 2)
    with torch.no_grad():
        picked = position_logits(model, batch)
        full = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                              "image_grid_thw")}).logits
    rows, cols = batch["positions"].T
    assert torch.allclose(picked, full[rows, cols].float(), atol=1e-5)
    label_ids = label_word_ids(processor.tokenizer)
    assert batch["target"].tolist() == [int(t) for ts in enc["targets"] for t in ts]
    assert picked[:, list(label_ids)].isfinite().all()


def test_task_1_refused_naming_the_marker_when_the_tokenizer_lacks_it(records):
    """A real checkpoint's tokenizer without the option markers (Idefics3's, SmolVLM's) gets a clear refusal for
    Task 1, not a count mismatch; Task 2 needs no marker."""
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="<|endoftext|>")
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    processor = Idefics3Processor(image_processor=image_processor(56), tokenizer=tok, image_seq_len=4,
                                  chat_template=template)
    claim = next(r for r in records if r["task"] == "factuality")
    assert len(encode_records(record_units([claim]), processor)["positions"][0]) == 1
    with pytest.raises(ValueError, match="the option marker <\\|object_ref_end\\|> is not a token of this tokenizer"):
        encode_records(record_units([next(r for r in records if r["task"] == "hallucination")]), processor)
