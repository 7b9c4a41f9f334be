"""LoRA students (PEFT): wrap a model with an adapter, and restore an adapter's weights on resume.

A LoRA stage trains only the adapter; its model dir holds merged weights (an ordinary HF dir, what teachers and
`hkd evaluate` load) and the adapter itself under `adapter/` (`PeftModel.from_pretrained(base, dir/"adapter")`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTER_DIR = "adapter"


def add_lora(model: torch.nn.Module, settings: dict) -> torch.nn.Module:
    """Freeze the model and attach a LoRA adapter (`settings`: r, alpha, dropout, target_modules).

    PEFT is imported here, not at module level: only LoRA stages use it, and every train worker imports this
    module (about 0.3 CPU s on top of transformers on a 2-core machine)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=list(settings["target_modules"]), bias="none")
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """Without PEFT imported (by `add_lora` or a caller) no model can be a PEFT model: asking never imports it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def load_adapter_weights(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Put a saved adapter's weights into an already wrapped model (resuming a LoRA stage)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: adapter does not match the model: {result.unexpected_keys[:3]}")
