"""Qwen3-VL: the tiny level's config and the processor without a video processor.

Same input format, special tokens and chat conventions as Qwen2.5-VL (`workers.models.families.qwen2_5_vl`); it
differs in 16-pixel patches, learned vision position embeddings, DeepStack (vision features of several ViT
layers added to the first decoder layers) and interleaved multimodal RoPE."""

from __future__ import annotations

import math

from transformers import (
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from workers.models.families.qwen2_5_vl import (
    qwen_image_processor,
    text_config,
    vision_config,
    vision_token_ids,
)
from workers.models.shapes import LevelShape

MODEL = Qwen3VLForConditionalGeneration
PATCH = 16


class HKDQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor without a video processor (it needs torchvision), as `HKDProcessor` for Qwen2.5-VL."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        for name in ("image", "video", "vision_start", "vision_end"):
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(getattr(self, f"{name}_token")))
        super(Qwen3VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str) -> HKDQwen3VLProcessor:
    """Images resized up to the next multiple of 32 pixels (a 2 x 2 merge of 16-pixel patches): pinned to
    `image_size` itself, Qwen's resize would round a 56-pixel image down to 32, one image token."""
    side = math.ceil(image_size / (2 * PATCH)) * 2 * PATCH
    return HKDQwen3VLProcessor(image_processor=qwen_image_processor(side, patch_size=PATCH),
                               tokenizer=tokenizer, chat_template=chat_template)


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """A Qwen3-VL config of the given shape over the shared tokenizer (init as the Qwen2.5-VL levels')."""
    text = text_config(shape, tokenizer)
    text = {**text, "head_dim": shape.hidden // shape.heads,
            "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True}}
    vision = {**vision_config(shape, patch_size=PATCH),
              "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to the image's
              "deepstack_visual_indexes": [shape.vision_depth - 1]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         **vision_token_ids(tokenizer))
