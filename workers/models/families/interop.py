"""A model dir's processor files as the family's own processor writes them, so plain `transformers` loads them.

hkd's processor classes (`HKDProcessor`, …) are their family's own without the video processor, which needs
torchvision (not installable beside the CPU torch: docs/real-models.md). Saved as they are, a dir names a class
only hkd has: `AutoProcessor.from_pretrained` falls back to a bare tokenizer and the family's own class finds no
video processor config. So `save_model_dir` rewrites the processor files: the family's own class (in
`processor_config.json` and `tokenizer_config.json`), and, where that class has a video processor, one written
from the image processor's settings (hkd never sees a video). hkd still loads these dirs with its own classes,
which ignore the video part; plain `transformers` needs torchvision for exactly the classes that need it on the
hub's own checkpoints (docs/interop.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# the image settings a video processor of these families shares with its image processor
SHARED_SETTINGS = ("size", "image_mean", "image_std", "resample", "rescale_factor", "do_resize", "do_rescale",
                   "do_normalize", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size")


@dataclass(frozen=True)
class OwnProcessor:
    """A family's own processor in `transformers`: its class, its video processor's class (None: it has none) and
    the image settings under which it processes an image as hkd's class does."""

    name: str
    video: str | None = None
    image_settings: dict = field(default_factory=dict)


def video_config(image: dict, video_class: str) -> dict:
    """A video processor config with the image processor's shared settings."""
    return {"video_processor_type": video_class, **{k: image[k] for k in SHARED_SETTINGS if k in image}}


def write_own_processor_files(model_dir: str | Path, own: OwnProcessor) -> None:
    """Rewrite a saved processor's files (`processor_config.json`, `tokenizer_config.json`) to name the family's
    own class, with its video processor where it has one."""
    path = Path(model_dir) / "processor_config.json"
    saved = json.loads(path.read_text())
    saved["processor_class"] = own.name
    image = saved.get("image_processor")
    if isinstance(image, dict):
        saved["image_processor"] = image = {**image, **own.image_settings}
    if own.video and "video_processor" not in saved:
        saved["video_processor"] = video_config(image or {}, own.video)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    tokenizer = Path(model_dir) / "tokenizer_config.json"
    if tokenizer.is_file():
        config = json.loads(tokenizer.read_text())
        if "processor_class" in config:
            tokenizer.write_text(json.dumps({**config, "processor_class": own.name}, indent=2, ensure_ascii=False)
                                 + "\n")
