"""Load hkd's model dirs as someone without hkd would, and print what came out (one JSON line).

Run by tests/test_hf_interop.py in a subprocess: it imports only transformers, peft, torch, PIL and json (plus the
standard library), scores records with the snippet of docs/interop.md (executed from the page, so the page is
what is tested), and leaves the judging to the test. Usage: `python hf_interop_check.py SPEC.json`, where the spec
is `{"docs": "docs/interop.md", "records": [record, ...], "cases": [{"dir": ..., "base": dir or null}, ...]}`
(records with absolute image paths; `base`: a LoRA student's base model dir).
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available


def snippet(docs: str) -> dict:
    """The functions of the page's first Python block."""
    code = re.search(r"^```python\n(.*?)^```", Path(docs).read_text(), flags=re.S | re.M).group(1)
    namespace: dict = {}
    exec(compile(code, docs, "exec"), namespace)
    return namespace


def images_only(name: str) -> type:
    """The family's own processor class without its video processor, for a process without torchvision (which
    `transformers` needs to build any video processor): the class's own image and text code, its video part left
    out (hkd never sends a video). SmolVLM's chat template reads the video processor's frame defaults."""
    own = getattr(transformers, name)

    class ImagesOnly(own):
        video_processor = types.SimpleNamespace(num_frames=None, fps=None)

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in own.get_attributes() if a != "video_processor"]

    return ImagesOnly


def auto_processor(model_dir: str) -> tuple[object | None, str]:
    """`AutoProcessor.from_pretrained`, and the class it gave or the error it raised."""
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
        return processor, type(processor).__name__
    except Exception as e:  # noqa: BLE001 - reported, judged by the test
        return None, f"{type(e).__name__}: {e}"


def check(case: dict, records: list[dict], fns: dict) -> dict:
    """What plain transformers and peft make of one model dir."""
    saved = json.loads((Path(case["dir"]) / "processor_config.json").read_text())
    processor, auto = auto_processor(case["dir"])
    if processor is None:
        processor = images_only(saved["processor_class"]).from_pretrained(case["dir"])
    model = AutoModelForImageTextToText.from_pretrained(case["dir"], dtype=torch.float32).eval()
    images = {r["id"]: Image.open(r["image"]).convert("RGB") for r in records}
    out = {"dir": case["dir"], "auto_processor": auto, "processor_used": type(processor).__name__,
           "processor_class": saved["processor_class"],
           "video_processor_type": saved.get("video_processor", {}).get("video_processor_type"),
           "model_class": type(model).__name__,
           "scores": {r["id"]: fns["hkd_scores"](model, processor, r, images[r["id"]]) for r in records},
           "generated": {r["id"]: fns["hkd_generated"](model, processor, r, images[r["id"]]) for r in records}}
    if case.get("base"):
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(case["base"], dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(Path(case["dir"]) / "adapter")).eval()
        out["peft_class"] = type(peft).__name__
        out["peft_scores"] = {r["id"]: fns["hkd_scores"](peft, processor, r, images[r["id"]]) for r in records}
    return out


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fns = snippet(spec["docs"])
    results = [check(case, spec["records"], fns) for case in spec["cases"]]
    hkd = sorted(m for m in sys.modules if m.split(".")[0] in ("workers", "orchestrator", "bench"))
    print(json.dumps({"torchvision": is_torchvision_available(), "transformers": transformers.__version__,
                      "hkd_modules": hkd, "results": results}))


if __name__ == "__main__":
    main(sys.argv[1])
