"""Idefics3: the tiny level's config, its tokenizer (the shared one plus Idefics3's image tokens) and processor.

Its images reach the model as per-image pixel tensors with a pixel mask (`workers.models.families.formats.PIXELS`):
a SigLIP-style vision tower, a pixel shuffle that merges `scale_factor` x `scale_factor` patches into one image
token, and a Llama text decoder. A tiny level never splits an image into tiles: each image is resized to one
square and gives (side / 14 / 2)^2 `<image>` tokens (4 for 56 px) between two `<fake_token_around_image>`s.
"""

from __future__ import annotations

import copy
import math

from tokenizers import AddedToken
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import (
    Idefics3ImageProcessorPil,
)

from workers.models.families.qwen2_5_vl import decoder_config, special_ids
from workers.models.shapes import LevelShape

MODEL = Idefics3ForConditionalGeneration
PROCESSOR = Idefics3Processor  # used as it is: it has no video processor (those need torchvision)
PATCH, SCALE = 14, 2
POSITION_GRID = 8  # the vision tower's learned positions, bucketed to each image's patch grid
# Idefics3's image tokens, appended to the shared tokenizer (the Qwen levels' ids stay as they are)
IMAGE_TOKEN, AROUND_IMAGE, GLOBAL_IMAGE, END_OF_UTTERANCE = (
    "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # what the shared chat template writes for an image


def appended(tokenizer: PreTrainedTokenizerFast, tokens: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A copy of the shared tokenizer with a family's image tokens appended as special tokens (idempotent, so
    every level of a run gets the same ids; the Qwen levels' ids stay as they are)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in tokens], special_tokens=True)
    return tok


def with_image_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The shared tokenizer with Idefics3's image tokens, `<image>` as its image token."""
    tok = appended(tokenizer, (IMAGE_TOKEN, AROUND_IMAGE, GLOBAL_IMAGE, END_OF_UTTERANCE))
    tok.image_token = IMAGE_TOKEN
    return tok


def side(image_size: int) -> int:
    """Images are resized up to a multiple of 28 pixels (2 x 2 patches of 14 merge into one token)."""
    return math.ceil(image_size / (SCALE * PATCH)) * SCALE * PATCH


def image_processor(image_size: int, cls: type = Idefics3ImageProcessorPil) -> Idefics3ImageProcessorPil:
    """Pillow image processor (no torchvision) pinned to one square, without tiling (SmolVLM's is the same)."""
    px = side(image_size)
    return cls(do_image_splitting=False, size={"longest_edge": px}, max_image_size={"longest_edge": px})


def processor_parts(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str,
                    image_processor_class: type = Idefics3ImageProcessorPil) -> dict:
    """What an Idefics3-style processor is built from: the image processor, the tokenizer with the image
    tokens, the image's token count, and the shared chat template with `<image>` as the image's placeholder."""
    return dict(image_processor=image_processor(image_size, image_processor_class),
                tokenizer=with_image_tokens(tokenizer), image_seq_len=(side(image_size) // PATCH // SCALE) ** 2,
                chat_template=chat_template.replace(QWEN_IMAGE, IMAGE_TOKEN))


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str) -> Idefics3Processor:
    """Idefics3's own processor: it has no video processor, so it builds without torchvision."""
    return Idefics3Processor(**processor_parts(tokenizer, image_size, chat_template))


def text_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """A Llama decoder over the shared tokenizer plus the image tokens, initialised as the Qwen levels'."""
    return dict(decoder_config(shape, with_image_tokens(tokenizer)), model_type="llama", tie_word_embeddings=False)


def siglip_config(shape: LevelShape, image_size: int) -> dict:
    """A SigLIP-style vision tower of 14-px patches (Idefics3's and Gemma 3's) with learned positions for
    `image_size` pixels."""
    return dict(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_hidden * 2,
                num_hidden_layers=shape.vision_depth, num_attention_heads=shape.vision_heads,
                image_size=image_size, patch_size=PATCH, initializer_range=shape.vision_hidden ** -0.5)


def config_fields(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """An Idefics3-style config's fields for the given shape over the shared tokenizer."""
    return dict(text_config=text_config(shape, tokenizer), vision_config=siglip_config(shape, POSITION_GRID * PATCH),
                scale_factor=SCALE, image_token_id=with_image_tokens(tokenizer).convert_tokens_to_ids(IMAGE_TOKEN),
                tie_word_embeddings=False, pad_token_id=special_ids(tokenizer)["<|endoftext|>"])


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> Idefics3Config:
    return Idefics3Config(**config_fields(shape, tokenizer))
