"""Bad input, round two, through the CLI: every class is refused with exit code 2 and `FILE:LINE: cause`, and
`hkd data validate` lists every bad line (up to --max-errors) with counts per task."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.cli import main
from workers.data.records import DataError, load_jsonl, to_rgb


def _fact(i: int = 1, **kw) -> dict:
    return {"id": f"f{i}", "task": "factuality", "image": "i.png", "context": "a photo", "claim": "it is red",
            "label": True, **kw}


def _hall(i: int = 1, **kw) -> dict:
    return {"id": f"h{i}", "task": "hallucination", "image": "i.png", "caption": "a red square",
            "options": ["red", "square", "dog"], "hallucinated": [False, False, True], **kw}


@pytest.fixture
def d(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "i.png")
    return tmp_path


def _write(d: Path, lines: list, name: str = "f.jsonl") -> Path:
    p = d / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode())
                           + b"\n" for x in lines))
    return p


def _validate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "validate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------ validate lists every error


def test_validate_lists_every_bad_line_with_counts_per_task(d, capsys):
    p = _write(d, [_hall(1), "{oops", _fact(1, label=1), _fact(2), _hall(2, options=["a", "a"], hallucinated=[1, 0]),
                   _fact(1), '"just a string"', _hall(3, caption="")])
    code, out, err = _validate(capsys, p)
    assert code == 2
    assert f"{p}:2: invalid JSON" in err
    assert f"{p}:3: field 'label': expected boolean, got number" in err
    assert f"{p}:5: field 'hallucinated[0]': expected boolean, got number" in err
    assert f"{p}:6: duplicate id 'f1' (first seen at line 3)" in err
    assert f"{p}:7: expected a JSON object, got string" in err
    assert f"{p}:8: field 'caption' is empty" in err
    assert f"{p}: 8 records read, 6 bad, 2 good" in out
    assert "hallucination: 3 records (2 bad, 1 good)" in out
    assert "factuality: 3 records (2 bad, 1 good)" in out
    assert "(no task): 2 records (2 bad, 0 good)" in out
    assert "hkd: error: 6 bad line(s)" in err and "Traceback" not in err


def test_validate_max_errors_caps_the_list_not_the_count(d, capsys):
    p = _write(d, [_fact(i, label="yes") for i in range(10)])
    code, out, err = _validate(capsys, p, "--max-errors", "3")
    assert code == 2
    assert [line.split(": ")[0] for line in err.splitlines()[:3]] == [f"{p}:{i}" for i in (1, 2, 3)]
    assert f"{p}:4:" not in err
    assert "10 bad line(s) (7 not listed: --max-errors 3)" in err
    assert f"{p}: 10 records read, 10 bad, 0 good" in out


def test_validate_good_files_exit_0(d, capsys):
    code, out, err = _validate(capsys, _write(d, [_hall(1), _fact(1)]))
    assert code == 0 and err == ""
    assert "hallucination: 1 records (0 bad, 1 good), 3 options, 33.3% hallucinated" in out


def test_other_commands_stop_at_first_error_and_point_to_validate(d, capsys, tiny_model_dir):
    p = _write(d, [_fact(1), _fact(2, claim=""), _fact(3, claim="")])
    assert main(["predict", str(tiny_model_dir), str(p), "--out", str(d / "preds.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"hkd: error: {p}:2: field 'claim' is empty" in err and f"{p}:3:" not in err
    assert f"`hkd data validate {p}` lists every bad line of the file" in err
    assert main(["evaluate", str(tiny_model_dir), str(p)]) == 2
    assert f"`hkd data validate --labels {p}`" in capsys.readouterr().err
    assert not (d / "preds.jsonl").exists()


# --------------------------------------------------------------------------------------------- encodings


def test_utf8_bom_accepted(d, capsys):
    p = d / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(_fact(1)).encode() + b"\n")
    assert load_jsonl(p)[0]["id"] == "f1"
    (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([_fact(1)]).encode())
    assert load_jsonl(d / "bom.json")[0]["id"] == "f1"
    assert _validate(capsys, p)[0] == 0


def test_utf16_file_refused_as_not_utf8(d, capsys):
    p = d / "u16.jsonl"
    p.write_bytes((json.dumps(_fact(1)) + "\n").encode("utf-16"))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "data", "validate", str(p)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{p}:1: not UTF-8 (byte 0xff at column 1); the file looks UTF-16: save it as UTF-8" in proc.stderr


def test_latin1_byte_refused_with_line_and_column_and_validate_goes_on(d, capsys):
    bad = json.dumps(_fact(2, claim="caf_")).encode().replace(b"caf_", b"caf\xe9")
    p = _write(d, [_fact(1), bad, _fact(3, label="no")])
    column = bad.index(b"\xe9") + 1
    code, out, err = _validate(capsys, p)
    assert code == 2
    assert f"{p}:2: not UTF-8 (byte 0xe9 at column {column})" in err
    assert f"{p}:3: field 'label': expected boolean, got string" in err
    with pytest.raises(DataError, match=rf"f.jsonl:2: not UTF-8 \(byte 0xe9 at column {column}\)"):
        load_jsonl(p)
    (d / "bad.json").write_bytes(b'[\n {"id": "\xe9"}]')
    with pytest.raises(DataError, match=r"bad.json:2: not UTF-8 \(byte 0xe9 at column 10\)"):
        load_jsonl(d / "bad.json")


def test_config_not_utf8_refused_naming_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"name: x\n# caf\xe9\nseed: 1\n")
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert f"{cfg}:2: not UTF-8 (byte 0xe9 at column 6)" in capsys.readouterr().err
    cfg.write_bytes(b"\xef\xbb\xbfname: x\nseed: 1\nlevels: {L: {}, M: {}, S: {}}\n")  # a BOM is fine
    from orchestrator.config.schema import load_config

    assert load_config(cfg).seed == 1
    cfg.write_bytes("name: x\n".encode("utf-16"))
    assert main(["plan", str(cfg)]) == 2
    assert f"{cfg}:1: not UTF-8 (byte 0xff at column 1)" in capsys.readouterr().err


@pytest.mark.parametrize("line, cause", [
    ('{"id": ' + "9" * 5000 + "}", "invalid JSON: a number of more than 4300 digits"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
    (json.dumps(_fact(1, claim="x\ud800y")), "field 'claim' contains an unpaired surrogate \\ud800 at character 2"),
    (json.dumps(_fact(1, image="i.png\u0000x")), "field 'image' contains a NUL character"),
    (json.dumps(_fact(1, image=1e308 * 10)), "field 'image': expected string, got number"),
    (json.dumps(_hall(1, options=["red<|object_ref_end|>", "dog"], hallucinated=[True, False])),
     "field 'options[0]' contains '<|object_ref_end|>', a special token of the model's prompt format"),
    (json.dumps(_fact(1, context="see <|image_pad|>")),
     "field 'context' contains '<|image_pad|>', a special token of the model's prompt format"),
    (json.dumps(_fact(1, task="x" * 500)), "unknown task 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'"),
])
def test_junk_lines_get_a_specific_cause(d, capsys, line, cause):
    p = _write(d, [line])
    code, _, err = _validate(capsys, p)
    assert code == 2 and f"{p}:1: {cause}" in err


# ----------------------------------------------------------------------------------------------- images


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with no pixel data (never decodable, never decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_huge_image_refused_from_its_header(d, capsys):
    _png_header_only(d / "huge.png", 10_000, 10_000)
    _png_header_only(d / "bomb.png", 20_000, 20_000)  # past PIL's own hard limit
    p = _write(d, [_fact(1, image="huge.png"), _fact(2, image="bomb.png"), _fact(3)])
    code, out, err = _validate(capsys, p)
    assert code == 2
    assert (f"{p}:1: image is 10000x10000 = 100,000,000 pixels, above data.max_image_pixels (64,000,000): "
            f"{d / 'huge.png'}") in err
    assert f"{p}:2: image has more than 178,956,970 pixels, above data.max_image_pixels (64,000,000)" in err
    assert f"{p}: 3 records read, 2 bad, 1 good" in out


def test_max_image_pixels_from_the_config(d, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("levels: {L: {}, M: {}, S: {}}\ndata: {max_image_pixels: 40}\n")
    p = _write(d, [_fact(1)])
    code, _, err = _validate(capsys, "--config", cfg, p)
    assert code == 2 and f"{p}:1: image is 8x8 = 64 pixels, above data.max_image_pixels (40)" in err


def test_alpha_palette_and_16_bit_images_are_converted(d, capsys):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(d / "rgba.png")
    Image.new("LA", (8, 8), (10, 128)).save(d / "la.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(d / "pal.png", transparency=0)
    Image.new("I;16", (8, 8), 65535).save(d / "deep.png")
    names = ["rgba.png", "la.png", "pal.png", "deep.png"]
    p = _write(d, [_fact(i, image=name) for i, name in enumerate(names)])
    assert _validate(capsys, p)[0] == 0
    pixels = {}
    for name in names:
        with Image.open(d / name) as im:
            rgb = to_rgb(im)
        assert rgb.mode == "RGB"
        pixels[name] = rgb.getpixel((0, 0))
    assert pixels == {"rgba.png": (255, 255, 255), "la.png": (132, 132, 132), "pal.png": (0, 255, 0),
                      "deep.png": (255, 255, 255)}


def test_truncated_and_corrupt_images_refused_without_their_bytes(d, capsys):
    good = (d / "i.png").read_bytes()
    (d / "cut.png").write_bytes(good[: len(good) // 2])
    (d / "junk.png").write_bytes(good[:33] + struct.pack(">I", 6) + b"SECRET" + b"TOPSECRETDATA" * 3)
    p = _write(d, [_fact(1, image="cut.png"), _fact(2, image="junk.png")])
    code, _, err = _validate(capsys, p)
    assert code == 2
    assert f"{p}:1: cannot decode image {d / 'cut.png'}" in err
    assert f"{p}:2: cannot decode image {d / 'junk.png'}" in err
    assert "SECRET" not in err.replace(str(d), "")


# ------------------------------------------------------------------------------------------------- text


def test_duplicate_options_and_empty_text_refused(d, capsys):
    p = _write(d, [_hall(1, options=["red", "dog", "red"]), _hall(2, options=["red", " "]),
                   _fact(3, context=""), _hall(4, caption="\t\n")])
    code, _, err = _validate(capsys, p)
    assert code == 2
    assert f"{p}:1: field 'options': items 0 and 2 are the same option 'red'" in err
    assert f"{p}:2: field 'options[1]' is only whitespace" in err
    assert f"{p}:3: field 'context' is empty" in err
    assert f"{p}:4: field 'caption' is only whitespace" in err


def test_prompt_longer_than_the_context_refused_by_validate(d, capsys, tiny_model_dir):
    long_caption = " ".join(["a red square near a blue circle"] * 800)
    p = _write(d, [_hall(1), _hall(2, caption=long_caption), _fact(3)])
    code, out, err = _validate(capsys, "--model-dir", tiny_model_dir, p)
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith(f"{p}:2: "))
    assert "tokens after tokenization, longer than the model's context of 4,096 tokens" in line
    assert int(line.split("prompt is ")[1].split(" tokens")[0].replace(",", "")) > 4096
    assert f"{p}: 3 records read, 1 bad, 2 good" in out
    assert _validate(capsys, p)[0] == 0  # without a model dir there is no context to check against


def test_training_inputs_see_the_converted_image(d, tiny_model_dir):
    """encode_records reads images through the same conversion: a transparent image is white, 16-bit is scaled."""
    import numpy as np

    from workers.models.families import load_processor
    from workers.models.prompts import encode_records, record_units

    Image.new("RGBA", (112, 112), (255, 0, 0, 0)).save(d / "clear.png")
    Image.new("RGB", (112, 112), (255, 255, 255)).save(d / "white.png")
    Image.new("I;16", (112, 112), 32768).save(d / "deep.png")
    Image.new("RGB", (112, 112), (128, 128, 128)).save(d / "grey.png")
    names = ["clear.png", "white.png", "deep.png", "grey.png"]
    records = load_jsonl(_write(d, [_fact(i, image=name) for i, name in enumerate(names)]))
    enc = encode_records(record_units(records), load_processor(tiny_model_dir))
    pixels = [np.asarray(p, dtype=np.float32) for p in enc["pixel_values"]]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[2], pixels[3])


# ------------------------------------------------ scoring commands: the size cap, then the prompt-length check

SENTENCE = "the small red square is left of a large blue circle near the top edge of the photo".split()
SCORING = ["evaluate", "predict", "calibrate"]


def _words(n: int) -> str:
    return " ".join(SENTENCE[i % len(SENTENCE)] for i in range(n))


def _options(n: int) -> dict:
    return {"options": [f"object {i}" for i in range(n)], "hallucinated": [i % 2 == 0 for i in range(n)]}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, tiny_model_dir) -> Path:
    """A copy of the tiny model dir (a 4,096-position context): `calibrate` stores its shift in the dir."""
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("scorer") / "model"))


def _score(command: str, model: Path, data: Path, *flags: str) -> tuple[int, float]:
    """Exit code and wall seconds of a scoring command on one file."""
    import time

    out = ["--out", str(data.with_suffix(".preds.jsonl"))] if command == "predict" else []
    start = time.perf_counter()
    code = main([command, str(model), str(data), *out, *flags])
    return code, time.perf_counter() - start


@pytest.mark.parametrize("command", SCORING)
@pytest.mark.parametrize("long", [{"claim": _words(6000)}, _options(5000)], ids=["6000-word claim", "5000 options"])
def test_prompt_longer_than_the_context_refused_by_every_scoring_command(d, capsys, scorer, command, long):
    rec = (_fact(2, **long) if "claim" in long else _hall(2, **long))
    p = _write(d, [_fact(1), rec, _hall(3)])
    code, seconds = _score(command, scorer, p)
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10, (code, seconds)
    line = next(x for x in err.splitlines() if x.startswith(f"hkd: error: {p}:2: prompt is "))
    assert line.endswith("tokens after tokenization, longer than the model's context of 4,096 tokens")
    assert int(line.split("prompt is ")[1].split(" tokens")[0].replace(",", "")) > 4096
    labels = "--labels " if command != "predict" else ""
    assert f"`hkd data validate {labels}--model-dir {scorer} {p}` lists every bad line" in err
    assert not p.with_suffix(".preds.jsonl").exists() and "Traceback" not in err


@pytest.mark.parametrize("command", SCORING)
def test_size_cap_refuses_a_huge_claim_before_any_tokenizing(d, capsys, scorer, command):
    p = _write(d, [_fact(1), _fact(2, claim=_words(300_000))])
    code, seconds = _score(command, scorer, p)
    assert code == 2 and seconds < 2, (code, seconds)
    err = capsys.readouterr().err
    assert f"{p}:2: field 'claim' is {len(_words(300_000)):,} characters, above data.max_text_chars (1,310,720)" in err


def test_validate_config_applies_the_size_cap_and_the_length_check_takes_the_rest(d, capsys, scorer, tmp_path):
    """The 300,000-word claim is past the default cap; the 6,000-word one is not, and only the model's context
    refuses it. A config's own cap (text characters, options) applies to `validate --config`."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("levels: {L: {}, M: {}, S: {}}\n")
    huge, long = _write(d, [_fact(1, claim=_words(300_000))], "huge.jsonl"), _write(d, [_fact(1, claim=_words(6000))])
    code, _, err = _validate(capsys, "--config", cfg, huge)
    chars = len(_words(300_000))
    assert code == 2
    assert f"{huge}:1: field 'claim' is {chars:,} characters, above data.max_text_chars (1,310,720)" in err
    assert _validate(capsys, "--config", cfg, long)[0] == 0
    code, _, err = _validate(capsys, "--config", cfg, "--model-dir", scorer, long)
    assert code == 2 and f"{long}:1: prompt is " in err
    cfg.write_text("levels: {L: {}, M: {}, S: {}}\ndata: {max_text_chars: 30, max_options: 2}\n")
    p = _write(d, [_fact(1, context="a photo of a red square on a white table"), _hall(2), _fact(3)], "cap.jsonl")
    code, _, err = _validate(capsys, "--config", cfg, p)
    assert code == 2 and f"{p}:1: field 'context' is 40 characters, above data.max_text_chars (30)" in err
    assert f"{p}:2: field 'options' has 3 items, above data.max_options (2)" in err and f"{p}:3:" not in err


def test_predict_skip_too_long_keeps_one_line_per_record_in_order(d, capsys, scorer):
    records = [_fact(1), _fact(2, claim=_words(6000)), _hall(3), _hall(4, **_options(5000))]
    p = _write(d, records)
    assert _score("predict", scorer, p, "--skip-too-long")[0] == 0
    rows = [json.loads(x) for x in p.with_suffix(".preds.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["f1", "f2", "h3", "h4"]
    for row in rows[1::2]:
        assert set(row) == {"id", "skipped"} and "longer than the model's context of 4,096 tokens" in row["skipped"]
    out = capsys.readouterr().out
    assert "2 predictions written" in out and "2 record(s) skipped" in out and f"{p}:2, {p}:4" in out
    short = _write(d, [records[0], records[2]], "short.jsonl")
    assert _score("predict", scorer, short)[0] == 0
    assert [json.loads(x) for x in short.with_suffix(".preds.jsonl").read_text().splitlines()] == rows[0::2]
