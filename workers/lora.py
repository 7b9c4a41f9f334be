"""LoRA students (PEFT): wrap a model with an adapter, and restore an adapter's weights on resume.

A LoRA stage trains only the adapter; its model dir holds merged weights (an ordinary HF dir, what teachers and
`hkd evaluate` load) and the adapter itself under `adapter/` (`PeftModel.from_pretrained(base, dir/"adapter")`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

ADAPTER_DIR = "adapter"


def add_lora(model: torch.nn.Module, settings: dict) -> PeftModel:
    """Freeze the model and attach a LoRA adapter (`settings`: r, alpha, dropout, target_modules)."""
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=list(settings["target_modules"]), bias="none")
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def load_adapter_weights(model: PeftModel, adapter_dir: str | Path) -> None:
    """Put a saved adapter's weights into an already wrapped model (resuming a LoRA stage)."""
    result = set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: adapter does not match the model: {result.unexpected_keys[:3]}")
