"""Model families: what differs between VLM families, one module per family, behind one small interface.

A level's family is its model dir's `config.json` `model_type` (a real checkpoint or a built tiny level), or
the `family:` key of a tiny level's config. Everything else (Ray stages, teachers, losses, cache, calibration,
reports) is family-agnostic. Prompts and supervised positions are the same in every family (`workers.models.prompts`);
how images reach the model is one of four formats (`workers.models.families.formats`): the Qwen-VL families' flattened
patches with their grid, Idefics3's per-image pixel tensors with a pixel mask, Gemma 3's fixed-size images
with token types, or InternVL's fixed-size tiles with their sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from transformers import (
    AutoConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from workers.models.families import (
    gemma3,
    idefics3,
    internvl,
    qwen2_5_vl,
    qwen3_vl,
    smolvlm,
)
from workers.models.families.interop import OwnProcessor
from workers.models.shapes import LevelShape


@dataclass(frozen=True)
class Family:
    """One VLM family: how to build a tiny random level of it, and how to load its processor."""

    name: str  # its Hugging Face `model_type`, and the tiny level's `family:` value
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]  # one without a video processor (those need torchvision)
    build_config: Callable[[LevelShape, PreTrainedTokenizerFast], PretrainedConfig]
    build_processor: Callable[[PreTrainedTokenizerFast, int, str], ProcessorMixin]  # tokenizer, image px, template
    own: OwnProcessor  # the family's own processor in transformers, which a saved model dir names


FAMILIES = {f.name: f for f in (
    Family("qwen2_5_vl", qwen2_5_vl.MODEL, qwen2_5_vl.HKDProcessor, qwen2_5_vl.build_config, qwen2_5_vl.build_processor,
           OwnProcessor("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor")),
    Family("qwen3_vl", qwen3_vl.MODEL, qwen3_vl.HKDQwen3VLProcessor, qwen3_vl.build_config, qwen3_vl.build_processor,
           OwnProcessor("Qwen3VLProcessor", "Qwen3VLVideoProcessor")),
    Family("idefics3", idefics3.MODEL, idefics3.PROCESSOR, idefics3.build_config, idefics3.build_processor,
           OwnProcessor("Idefics3Processor")),
    Family("smolvlm", smolvlm.MODEL, smolvlm.HKDSmolVLMProcessor, smolvlm.build_config, smolvlm.build_processor,
           OwnProcessor("SmolVLMProcessor", "SmolVLMVideoProcessor")),
    Family("gemma3", gemma3.MODEL, gemma3.PROCESSOR, gemma3.build_config, gemma3.build_processor,
           OwnProcessor("Gemma3Processor")),
    # InternVL's own processor crops an image into up to `max_patches` tiles; hkd's never does
    Family("internvl", internvl.MODEL, internvl.HKDInternVLProcessor, internvl.build_config,
           internvl.build_processor, OwnProcessor("InternVLProcessor", "InternVLVideoProcessor", {"max_patches": 1})),
)}


class UnsupportedFamilyError(ValueError):
    """A model dir of a family hkd has no adapter for; the message names the dir and the family."""


def family_of(model_dir: str | Path) -> Family:
    """The family of a model dir (or hub name), from its config's `model_type`; for a model of its own
    `model_type` (its own code, `trust_remote_code`), from the processor it was saved with, when that is one of
    these families' (then its inputs are that family's)."""
    local = Path(model_dir)
    model_type = (json.loads((local / "config.json").read_text()).get("model_type") if local.is_dir()
                  else AutoConfig.from_pretrained(model_dir).model_type)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    saved = local / "processor_config.json"
    processor = json.loads(saved.read_text()).get("processor_class") if saved.is_file() else None
    for family in FAMILIES.values():
        if processor in (family.processor_class.__name__, family.own.name):  # hkd's class (older dirs) or its own
            return family
    raise UnsupportedFamilyError(f"{model_dir}: model_type {model_type!r} is not a supported family "
                                 f"({', '.join(FAMILIES)})")


def load_processor(model_dir: str | Path) -> ProcessorMixin:
    """A model dir's processor (tokenizer, image processor, chat template), by its family."""
    return family_of(model_dir).processor_class.from_pretrained(model_dir)
