"""Gemma 3: the tiny level's config, its tokenizer (the shared one plus Gemma's image tokens) and processor.

Its images reach the model as one fixed-size pixel tensor per image with `token_type_ids` marking the image
tokens (`workers.models.families.formats.IMAGES`): a SigLIP vision tower, a projector that average-pools its patch grid
to `mm_tokens_per_image` tokens, and a Gemma 3 text decoder that attends bidirectionally within an image's
tokens. Like the real models (896 px, 64 x 64 patches pooled 4 x 4 to 256 tokens), a tiny level sees every
image at one size: 112 px, 8 x 8 patches of 14 pooled 4 x 4 to 4 `<image_soft_token>`s between
`<start_of_image>` and `<end_of_image>`, whatever the run's image size (a 56-px image is resized up to it).
"""

from __future__ import annotations

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import (
    Gemma3ImageProcessorPil,
)

from workers.models.families.idefics3 import PATCH, QWEN_IMAGE, appended, siglip_config
from workers.models.families.qwen2_5_vl import decoder_config, init_std
from workers.models.shapes import LevelShape

MODEL = Gemma3ForConditionalGeneration
PROCESSOR = Gemma3Processor  # used as it is: it has no video processor (those need torchvision)
SIDE, POOL = 112, 4  # the vision tower's one image size; patches pooled POOL x POOL into one image token
IMAGE_TOKENS = (SIDE // PATCH // POOL) ** 2
# Gemma's image tokens by their tokenizer's names: the chat template writes `boi_token`, the processor expands it
# to `\n\n<start_of_image>` + IMAGE_TOKENS x `<image_soft_token>` + `<end_of_image>\n\n`
NAMED_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
SLIDING_PATTERN = 6  # Gemma 3's five local (sliding-window) layers per global one


def with_image_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The shared tokenizer with Gemma's image tokens, under the names Gemma3Processor reads (`boi_token`,
    `image_token`, `eoi_token`; saved in tokenizer_config.json, so a reloaded processor finds them too).
    transformers 5 names new special tokens only through this private setter (its public `add_special_tokens`
    takes the standard names alone)."""
    tok = appended(tokenizer, tuple(NAMED_TOKENS.values()))
    tok._set_model_specific_special_tokens(NAMED_TOKENS)
    return tok


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str) -> Gemma3Processor:
    """Gemma 3's own processor with its Pillow image processor (no torchvision), resizing every image to SIDE (not
    `image_size`: the vision tower has one), without pan-and-scan; the shared chat template with Gemma's
    `<start_of_image>` placeholder for the image."""
    tok = with_image_tokens(tokenizer)
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": SIDE, "width": SIDE},
                                                                   do_pan_and_scan=False),
                           tokenizer=tok, image_seq_length=IMAGE_TOKENS,
                           chat_template=chat_template.replace(QWEN_IMAGE, tok.boi_token))


def layer_types(layers: int) -> list[str]:
    """Gemma 3's local/global pattern, with the last layer global so that even a one-layer level has one."""
    return ["full_attention" if (i + 1) % SLIDING_PATTERN == 0 or i == layers - 1 else "sliding_attention"
            for i in range(layers)]


def text_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> dict:
    """A Gemma 3 decoder over the shared tokenizer plus the image tokens, initialised as the other levels'.
    Attention scores are scaled by 1/sqrt(head_dim), as in the real models whose query_pre_attn_scalar is
    their head_dim; the sliding window outlasts any prompt here."""
    head_dim = shape.hidden // shape.heads
    return dict(decoder_config(shape, with_image_tokens(tokenizer)), model_type="gemma3_text", head_dim=head_dim,
                query_pre_attn_scalar=head_dim, sliding_window=1024, layer_types=layer_types(shape.layers),
                tie_word_embeddings=False)


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> Gemma3Config:
    """A Gemma 3 config of the given shape over the shared tokenizer."""
    tok = with_image_tokens(tokenizer)
    return Gemma3Config(text_config=text_config(shape, tokenizer),
                        vision_config=dict(siglip_config(shape, SIDE), model_type="siglip_vision_model"),
                        mm_tokens_per_image=IMAGE_TOKENS, image_token_index=tok.image_token_id,
                        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                        initializer_range=init_std(shape),
                        tie_word_embeddings=False)
