"""SmolVLM: Idefics3's model under its own classes, and its processor without the video part.

SmolVLM (SmolVLM, SmolVLM2) has Idefics3's architecture, image tokens and per-image pixel format
(`workers.models.families.formats.PIXELS`), so a tiny level is an Idefics3 one (`workers.models.families.idefics3`). Its
processor also prompts videos: it wants a video processor (torchvision) and `num2words` (a video prompt's
frame count in words), neither of which an image needs.
"""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.smolvlm.image_processing_pil_smolvlm import (
    SmolVLMImageProcessorPil,
)
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

from workers.models.families import idefics3
from workers.models.shapes import LevelShape

MODEL = SmolVLMForConditionalGeneration


class HKDSmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor for images only. ProcessorMixin reads the parts from `__init__`'s signature, so one
    without `video_processor` builds and reloads without torchvision; `num2words` is checked only by SmolVLM's
    own `__init__`, skipped here."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", idefics3.AROUND_IMAGE)
        self.image_token = getattr(tokenizer, "image_token", idefics3.IMAGE_TOKEN)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", idefics3.END_OF_UTTERANCE)
        self.global_image_token = getattr(tokenizer, "global_image_token", idefics3.GLOBAL_IMAGE)
        self.image_seq_len = image_seq_len
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs) -> str:
        """The chat template as any processor applies it: SmolVLM's own reads video defaults (frames, fps) from
        the video processor this one does not have."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, chat_template: str) -> HKDSmolVLMProcessor:
    return HKDSmolVLMProcessor(**idefics3.processor_parts(tokenizer, image_size, chat_template,
                                                          SmolVLMImageProcessorPil))


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> SmolVLMConfig:
    """An Idefics3 level's config under SmolVLM's config class."""
    return SmolVLMConfig(**idefics3.config_fields(shape, tokenizer))
