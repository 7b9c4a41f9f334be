"""Qwen2.5-VL: the tiny level's config and the processor without a video processor.

Its input format (`workers.models.prompts`) is shared with Qwen3-VL: token ids, flattened image patches with their
(t, h, w) grid, `mm_token_type_ids`."""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from workers.models.shapes import LevelShape

MODEL = Qwen2_5_VLForConditionalGeneration
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class HKDProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor.

    `Qwen2_5_VLProcessor` cannot be built without torchvision (its video processor needs it); ProcessorMixin
    reads the parts from `__init__`'s signature, so a signature without `video_processor` builds and reloads.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)



def qwen_image_processor(image_size: int, patch_size: int) -> Qwen2VLImageProcessorPil:
    """Qwen-VL image processor pinned to one square size, so every image gives the same token count."""
    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str) -> HKDProcessor:
    return HKDProcessor(image_processor=qwen_image_processor(image_size, patch_size=14), tokenizer=tokenizer,
                        chat_template=chat_template)


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's 16/24/24 of 64."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def decoder_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """The text decoder fields every family's tiny level shares: its shape, the tokenizer's size (a family's
    own image tokens included) and special ids, the init std."""
    ids = special_ids(tokenizer)
    return dict(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], initializer_range=init_std(shape),
    )


def text_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """The text decoder of a tiny Qwen-VL level (both Qwen-VL families)."""
    head_dim = shape.hidden // shape.heads
    return dict(decoder_config(shape, tokenizer), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)})


def vision_config(shape: LevelShape, patch_size: int) -> dict:
    """The vision tower of a tiny Qwen-VL level (both Qwen-VL families), merging 2 x 2 patches into a token."""
    return dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_hidden * 2,
        num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=patch_size, spatial_merge_size=2,
        temporal_patch_size=2, initializer_range=shape.vision_hidden ** -0.5,
    )


def vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The config's ids of the image, video and vision start/end tokens (the same tokens in both families)."""
    ids = special_ids(tokenizer)
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    names = ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {t: tokenizer.convert_tokens_to_ids(t) for t in names}


def init_std(shape: LevelShape) -> float:
    """HF's default std of 0.02 suits widths in the thousands; at tiny widths it leaves attention nearly uniform
    and image–text binding stalls for thousands of steps. 1/sqrt(width) learns it in tens."""
    return shape.init_std or shape.hidden ** -0.5


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given shape over the shared tokenizer."""
    vision = {**vision_config(shape, patch_size=14), "window_size": 112,
              "fullatt_block_indexes": [shape.vision_depth - 1]}
    return Qwen2_5_VLConfig(text_config=text_config(shape, tokenizer), vision_config=vision,
                            tie_word_embeddings=False, initializer_range=init_std(shape),
                            **vision_token_ids(tokenizer))
