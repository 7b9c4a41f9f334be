"""Qwen3-VL: the tiny level's config and the processor without a video processor.

Same input format, special tokens and chat conventions as Qwen2.5-VL (`workers.families.qwen2_5_vl`); it
differs in 16-pixel patches, learned vision position embeddings, DeepStack (vision features of several ViT
layers added to the first decoder layers) and interleaved multimodal RoPE."""

from __future__ import annotations

import math

from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from workers.families.qwen2_5_vl import mrope_section, qwen_image_processor, special_ids
from workers.shapes import LevelShape

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
    head_dim = shape.hidden // shape.heads
    std = shape.init_std or shape.hidden ** -0.5
    ids = special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], initializer_range=std,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim),
                         "mrope_interleaved": True},
    )
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_hidden * 2,
        num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=PATCH, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=64,  # an 8 x 8 grid, interpolated to the image's
        deepstack_visual_indexes=[shape.vision_depth - 1], initializer_range=shape.vision_hidden ** -0.5,
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
