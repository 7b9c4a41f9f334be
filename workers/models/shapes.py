"""The size of a tiny pyramid level, in a module without torch or transformers: the run config
(`orchestrator.config.schema`) takes its fields, defaults and bounds from it, and every process that reads a config
(a sweep trial's, for one) would otherwise import the model code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# the keys of `workers.models.families.FAMILIES`
FamilyName = Literal["qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "internvl"]


@dataclass(frozen=True)
class LevelShape:
    """Family and size of one pyramid level (text decoder + vision tower)."""

    family: FamilyName = field(default="qwen2_5_vl", metadata={"doc": "model family (its HF model_type) of a "
                                                                      "tiny level"})

    hidden: int = field(default=128, metadata={"bounds": {"ge": 8}})
    layers: int = field(default=2, metadata={"bounds": {"ge": 1}})
    heads: int = field(default=2, metadata={"bounds": {"ge": 1}})
    kv_heads: int = field(default=1, metadata={"bounds": {"ge": 1}})
    intermediate: int = field(default=352, metadata={"bounds": {"ge": 8}})
    vision_hidden: int = field(default=96, metadata={"bounds": {"ge": 8}})
    vision_depth: int = field(default=1, metadata={"bounds": {"ge": 1}})
    vision_heads: int = field(default=2, metadata={"bounds": {"ge": 1}})
    init_std: float | None = field(default=None, metadata={"bounds": {"gt": 0},
                                                           "doc": "weight init std; default 1/sqrt(hidden)"})
