"""The prompt-length check counts without encoding images (`workers.models.lengths`): its count must be the length the
training code's own encoding gives (`workers.models.prompts.encode_records`), for every family, both tasks and images of
several sizes, with dynamic resolution and tiling switched on too."""

from __future__ import annotations

import pytest
from PIL import Image

from workers.data import synth
from workers.data.records import load_jsonl
from workers.models.families import FAMILIES, load_processor
from workers.models.lengths import prompt_lengths
from workers.models.model_dirs import LevelShape, build_level
from workers.models.prompts import encode_records, record_units

SHAPE = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_depth=1,
             vision_heads=2)
SIZES = [(112, 112), (300, 200), (700, 1000), (900, 31)]  # (height, width): square, wide, tall, a sliver


@pytest.fixture(scope="module")
def sized(tmp_path_factory) -> list[dict]:
    """Records of both tasks (one with a long caption) on an image of each size."""
    tmp = tmp_path_factory.mktemp("lengths")
    synth.generate(tmp, seed=2, n_train=2, n_val=1, n_test=1)
    base = [r for t in synth.TASKS for r in load_jsonl(tmp / t / "train.jsonl")]
    base[0] = {**base[0], "caption": " ".join([base[0]["caption"]] * 30)}
    out = []
    for height, width in SIZES:
        Image.new("RGB", (width, height), (40, 90, 200)).save(tmp / f"{height}x{width}.png")
        out += [{**r, "id": f"{r['id']}@{height}x{width}", "image": str(tmp / f"{height}x{width}.png")} for r in base]
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> dict:
    tmp = tmp_path_factory.mktemp("families")
    return {name: build_level(tmp / name, LevelShape(family=name, **SHAPE), tokenizer, image_size=112)
            for name in FAMILIES}


def _dynamic(processor, family: str):
    """The processor as a real checkpoint's: Qwen-VL's resolution follows the image, Idefics3 and SmolVLM split it
    into tiles (Gemma 3 and InternVL see every image at one size in hkd, real checkpoints included)."""
    images = processor.image_processor
    if family.startswith("qwen"):
        images.size = {"shortest_edge": 56 * 56, "longest_edge": 1000 * 1000}
    elif family in ("idefics3", "smolvlm"):
        images.do_image_splitting = True
        images.size, images.max_image_size = {"longest_edge": 4 * 112}, {"longest_edge": 112}
    return processor


@pytest.mark.parametrize("dynamic", [False, True], ids=["as built", "dynamic"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_counted_length_is_the_encoded_length(sized, model_dirs, family, dynamic):
    processor = load_processor(model_dirs[family])
    if dynamic:
        processor = _dynamic(processor, family)
    encoded = encode_records(record_units(sized), processor)
    want = {rid: len(ids) for rid, ids in zip(encoded["record_id"].tolist(), encoded["input_ids"])}
    assert prompt_lengths(sized, processor) == want
    assert len(set(want.values())) > 2  # the sizes and texts do give different lengths


def test_count_reads_no_pixels(sized, model_dirs, tmp_path):
    """An image whose header says 4000 x 3000 and whose pixel data is missing: counted from the header alone."""
    from tests.test_bad_input import _png_header_only

    _png_header_only(tmp_path / "big.png", 4000, 3000)
    record = {**sized[0], "id": "big", "image": str(tmp_path / "big.png")}
    processor = _dynamic(load_processor(model_dirs["qwen2_5_vl"]), "qwen2_5_vl")
    small = prompt_lengths([sized[0]], processor)[sized[0]["id"]]
    assert prompt_lengths([record], processor)["big"] > small + 1000
