"""LoRA students: the model dir holds merged weights and the PEFT adapter, and both give the same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from orchestrator.config.schema import ConfigError, LoraSettings, load_config
from workers.models.lora import ADAPTER_DIR, add_lora
from workers.models.model_dirs import load_model_dir, save_model_dir
from workers.models.prompts import collate_records, encode_records, record_units
from workers.inference.logits import position_logits


@pytest.fixture(scope="module")
def batch(tiny_model_dir, records):
    model, processor = load_model_dir(tiny_model_dir)
    return collate_records(encode_records(record_units(records[:3]), processor),
                           processor.tokenizer.pad_token_id, model.config.image_token_id)


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return position_logits(model.eval(), batch)


def test_merged_weights_and_adapter_give_the_same_logits(tiny_model_dir, batch, tmp_path):
    model, processor = load_model_dir(tiny_model_dir)
    base_logits = _logits(model, batch)
    student = add_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]).model_dump())
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make the test vacuous
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    trained = _logits(student, batch)
    assert not torch.allclose(trained, base_logits, atol=1e-3)

    out = save_model_dir(student, processor, tmp_path / "S")
    torch.testing.assert_close(_logits(student, batch), trained)  # still usable after merging in place
    merged, _ = load_model_dir(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base, _ = load_model_dir(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, out / ADAPTER_DIR)
    torch.testing.assert_close(_logits(merged, batch), trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(merged, batch), atol=1e-5, rtol=1e-5)


def test_lora_settings_are_validated(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("levels: {S: {}}\ndirect: {levels: [S], train: {lora: {alfa: 8}}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'direct.train.lora.alfa' \(did you mean 'alpha'\?\)"):
        load_config(path)
    path.write_text("levels: {S: {}}\ndirect: {levels: [S], overrides: {S: {lora: {r: 4}, dtype: bfloat16}}}\n")
    train = load_config(path).train_for("S")
    assert train.lora.r == 4 and train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert train.dtype == "bfloat16"
