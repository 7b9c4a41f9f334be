"""InternVL (3.x, transformers' native format): the tiny level's config, its tokenizer (the shared one plus
InternVL's image tokens) and its processor without the video part.

A vision tower (InternViT: 14-px patches, a CLS token, learned positions for one image size), a pixel shuffle
that merges 2 x 2 patches into one image token, an MLP projector and a Qwen2 text decoder (real InternVL3
models use Qwen2.5 LMs). Its images reach the model as fixed-size tiles stacked over the batch, with their
sizes (`workers.models.families.formats.TILES`). Like the real models (448-px tiles, 32 x 32 patches shuffled to 256
tokens), a tiny level sees every image as one tile of one size, never cropped into several: 56 px, 4 x 4
patches shuffled to 4 `<IMG_CONTEXT>` tokens between `<img>` and `</img>`, whatever the run's image size.
"""

from __future__ import annotations

from transformers import (
    BatchFeature,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
)

from workers.models.families.idefics3 import PATCH, QWEN_IMAGE, appended, siglip_config
from workers.models.families.qwen2_5_vl import decoder_config, init_std
from workers.models.shapes import LevelShape

MODEL = InternVLForConditionalGeneration
SIDE, RATIO = 56, 0.5  # the vision tower's one tile size; the pixel shuffle's downsample ratio (2 x 2 → 1)
IMAGE_TOKENS = int((SIDE // PATCH * RATIO) ** 2)
# InternVL's tokens by their tokenizer's names (InternVLProcessor reads them): the image ones in the real
# tokenizers' order, and a video token only because InternVLProcessor wants one
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}


class HKDInternVLProcessor(InternVLProcessor):
    """InternVL's processor for images only, one tile per image. ProcessorMixin reads the parts from
    `__init__`'s signature, so one without `video_processor` builds and reloads without torchvision
    (InternVL's video processor needs it); InternVL's own `__init__` sets up the image tokens (the None it is
    given for the video processor is dropped: ProcessorMixin takes only the parts this signature names). Not
    cropping is the default here (InternVL's is to crop), so a real checkpoint's processor reloaded under this
    class gives one tile per image too."""

    images_kwargs = {"crop_to_patches": False}

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """InternVL's inputs plus each tile's (height, width) as `image_sizes`, which InternVL's forward takes
        and leaves unused: the column that says these inputs are `workers.models.families.formats.TILES`."""
        out = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            out["image_sizes"] = [list(tile.shape[-2:]) for tile in out["pixel_values"]]
            out.convert_to_tensors(kwargs.get("return_tensors"))
        return out


def with_image_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The shared tokenizer with InternVL's image tokens under the names InternVLProcessor reads (saved in
    tokenizer_config.json, so a reloaded processor finds them too), as Gemma 3's are named."""
    tok = appended(tokenizer, tuple(NAMED_TOKENS.values()))
    tok._set_model_specific_special_tokens(NAMED_TOKENS)
    return tok


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str) -> HKDInternVLProcessor:
    """A Pillow image processor (GotOcr2's, InternVL's own; no torchvision) resizing every image to SIDE (not
    `image_size`: the vision tower has one), with the real models' ImageNet normalisation; the shared chat
    template with InternVL's `<IMG_CONTEXT>` placeholder, which the processor expands to the image's tokens."""
    tok = with_image_tokens(tokenizer)
    images = GotOcr2ImageProcessorPil(size={"height": SIDE, "width": SIDE}, crop_to_patches=False,
                                      image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    return HKDInternVLProcessor(image_processor=images, tokenizer=tok, image_seq_length=IMAGE_TOKENS,
                                chat_template=chat_template.replace(QWEN_IMAGE, tok.context_image_token))


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    """An InternVL config of the given shape: a Qwen2 decoder over the shared tokenizer plus the image tokens,
    initialised as the other levels'."""
    tok = with_image_tokens(tokenizer)
    return InternVLConfig(text_config=dict(decoder_config(shape, tok), model_type="qwen2", tie_word_embeddings=False),
                          vision_config=dict(siglip_config(shape, SIDE), model_type="internvl_vision"),
                          image_token_id=tok.context_image_token_id, image_seq_length=IMAGE_TOKENS,
                          downsample_ratio=RATIO, initializer_range=init_std(shape), tie_word_embeddings=False)
