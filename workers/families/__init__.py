"""Model families: what differs between VLM families, one module per family, behind one small interface.

A level's family is its model dir's `config.json` `model_type` (a real checkpoint or a built tiny level), or
the `family:` key of a tiny level's config. Everything else (Ray stages, teachers, losses, cache, calibration,
reports) is family-agnostic. The two Qwen-VL families share one input format (`workers.prompts`: token ids,
flattened image patches with their grid, `mm_token_type_ids`), so they differ here only in config, model and
processor classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from workers.families import qwen2_5_vl, qwen3_vl
from workers.shapes import LevelShape


@dataclass(frozen=True)
class Family:
    """One VLM family: how to build a tiny random level of it, and how to load its processor."""

    name: str  # its Hugging Face `model_type`, and the tiny level's `family:` value
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]  # without a video processor (those need torchvision)
    build_config: Callable[[LevelShape, PreTrainedTokenizerFast], PretrainedConfig]
    build_processor: Callable[[PreTrainedTokenizerFast, int, str], ProcessorMixin]  # tokenizer, image px, template


FAMILIES = {f.name: f for f in (
    Family("qwen2_5_vl", qwen2_5_vl.MODEL, qwen2_5_vl.HKDProcessor, qwen2_5_vl.build_config, qwen2_5_vl.build_processor),
    Family("qwen3_vl", qwen3_vl.MODEL, qwen3_vl.HKDQwen3VLProcessor, qwen3_vl.build_config, qwen3_vl.build_processor),
)}


class UnsupportedFamilyError(ValueError):
    """A model dir of a family hkd has no adapter for; the message names the dir and the family."""


def family_of(model_dir: str | Path) -> Family:
    """The family of a model dir (or hub name), from its config's `model_type`."""
    local = Path(model_dir) / "config.json"
    model_type = (json.loads(local.read_text()).get("model_type") if local.is_file()
                  else AutoConfig.from_pretrained(model_dir).model_type)
    if model_type not in FAMILIES:
        raise UnsupportedFamilyError(f"{model_dir}: model_type {model_type!r} is not a supported family "
                                     f"({', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def load_processor(model_dir: str | Path) -> ProcessorMixin:
    """A model dir's processor (tokenizer, image processor, chat template), by its family."""
    return family_of(model_dir).processor_class.from_pretrained(model_dir)
