"""Property-based search (Hypothesis) for a data file that makes the loader or `hkd data validate` misbehave.

Valid labelled and unlabelled files are mutated at random: fields deleted or retyped, nested junk, huge
numbers, empty and duplicate strings, duplicate ids, lines cut short, bytes inserted, other encodings, bad
image bytes. Every outcome must be one of two:
- accepted, and then every record holds to the data contract (checked here independently of the loader);
- DataError / exit code 2 naming the file (and line) and one of the loader's specific causes.
Never any other exception (a traceback from `hkd`), never a hang: each case runs under a SIGALRM time limit.

A few seconds by default (a fixed set of cases, so CI is repeatable). A long random run:
    HKD_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/test_fuzz_data.py -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator.cli import main
from workers.data.records import TASKS, DataError, load_jsonl, to_rgb

EXAMPLES = int(os.environ.get("HKD_FUZZ_EXAMPLES", "0")) or 60
LONG_RUN = "HKD_FUZZ_EXAMPLES" in os.environ
CASE_SECONDS = int(os.environ.get("HKD_FUZZ_CASE_SECONDS", "30"))

# Every specific cause the loader gives, after `FILE:LINE: ` (or `FILE: ` for the whole file).
CAUSES = [
    r"invalid JSON: (.+ at column \d+|nested too deeply|a number of more than \d+ digits)",
    r"not UTF-8 \(byte 0x[0-9a-f]{2} at column \d+\)(; the file looks UTF-16: save it as UTF-8)?",
    r"expected a JSON object, got (null|boolean|number|string|array)",
    r"field '[a-z]+(\[\d+\])?': expected (string|boolean|array), got (null|boolean|number|string|array|object)",
    r"missing field '[a-z]+'",
    r"unknown task .+ \(valid: hallucination, factuality\)",
    r"field '[a-z]+(\[\d+\])?' (is empty|is only whitespace|contains a NUL character"
    r"|contains '<\|[a-z_]+\|>', a special token of the model's prompt format"
    r"|contains an unpaired surrogate \\u[0-9a-f]{4} at character \d+, which is not valid Unicode)",
    r"field 'options': items \d+ and \d+ are the same option .+",
    r"field 'options' has \d+ items but 'hallucinated' has \d+",
    r"duplicate id .+ \(first seen at line \d+\)",
    r"image not found: .+",
    r"unsupported image format \w+ \(expected PNG or JPEG\): .+",
    r"cannot decode image .+: (not an image file PIL can identify|the file is truncated|corrupt image data \(.+\))",
    r"image is \d+x\d+ = [\d,]+ pixels, above data\.max_image_pixels \([\d,]+\): .+",
    r"image has more than [\d,]+ pixels, above data\.max_image_pixels \([\d,]+\): .+",
    r"field '[a-z]+(\[\d+\])?' is [\d,]+ characters, above data\.max_text_chars \([\d,]+\)",
    r"field '[a-z]+' has [\d,]+ items, above data\.max_options \([\d,]+\)",
    r"file is empty",
    r"a \.json data file must hold one array of records",
]
_CAUSE = re.compile("|".join(f"(?:{c})" for c in CAUSES), re.S)


def _png(mode: str, color, **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), color).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64))]
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(body)) + kind + body
                                          + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


_GOOD = _png("RGB", (200, 10, 10))
IMAGES = {  # name -> bytes; the bad ones are only used when a mutation points a record at them
    "good.png": _GOOD,
    "good.jpg": _png("RGB", (10, 200, 10), format="JPEG"),
    "rgba.png": _png("RGBA", (1, 2, 3, 0)),
    "pal.png": _png("P", 3),
    "deep.png": _png("I;16", 40000),
    "anim.gif": _png("RGB", (0, 0, 0), format="GIF"),
    "cut.png": _GOOD[: len(_GOOD) // 2],
    "empty.png": b"",
    "junk.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3,
    "huge.png": _header_only(20_000, 4_000),
    "bomb.png": _header_only(60_000, 60_000),
}

_json_leaf = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=True)
              | st.text(max_size=12))
JUNK = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
HUGE = "\u0000HUGE\u0000"  # stands for an integer too long to print; spliced into the JSON text
STRINGS = st.sampled_from(["", " ", "\t\n", "x\ud800y", "a\u0000b", "red", "\u202e evil", "é" * 50, "x" * 5000,
                           "a <|image_pad|>", "b<|object_ref_end|>"])
IMAGE_REFS = st.sampled_from([*IMAGES, "missing.png", ".", "", "/", "../good.png", "sub/../good.png",
                              "good.png\u0000", "x" * 300 + ".png"])


def _record(task: str, i: int, labelled: bool) -> dict:
    if task == "hallucination":
        rec = {"id": f"h{i}", "task": task, "image": "good.png", "caption": "a red square",
               "options": ["red", "square", "dog"], "hallucinated": [False, False, True]}
    else:
        rec = {"id": f"f{i}", "task": task, "image": "good.png", "context": "a photo", "claim": "it is red",
               "label": bool(i % 2)}
    if not labelled:
        del rec["hallucinated" if task == "hallucination" else "label"]
    return rec


@st.composite
def record_mutation(draw, records: list):
    """Change one record in place (or replace it with a non-object)."""
    i = draw(st.integers(0, len(records) - 1))
    rec = records[i]
    kind = draw(st.sampled_from(["delete", "retype", "string", "string", "huge", "dup_id", "image", "image",
                                 "image", "not_object", "task", "options", "options", "labels", "extra"]))
    if not isinstance(rec, dict):
        return
    keys = sorted(rec)
    key = draw(st.sampled_from(keys)) if keys else "id"
    if kind == "delete" and keys:
        del rec[key]
    elif kind == "retype":
        rec[key] = draw(JUNK)
    elif kind == "string":
        rec[draw(st.sampled_from(["id", "caption", "context", "claim", "image"]))] = draw(STRINGS)
    elif kind == "huge":
        rec[key] = HUGE
    elif kind == "dup_id":
        other = records[draw(st.integers(0, len(records) - 1))]
        rec["id"] = other.get("id") if isinstance(other, dict) else "h0"
    elif kind == "image":
        rec["image"] = draw(IMAGE_REFS)
    elif kind == "not_object":
        records[i] = draw(JUNK.filter(lambda v: not isinstance(v, dict)))
    elif kind == "task":
        rec["task"] = draw(st.sampled_from([*TASKS, "vqa", "", "Hallucination"]))
    elif kind == "options":
        rec["options"] = draw(st.lists(STRINGS | st.sampled_from(["red", "dog"]), max_size=4))
    elif kind == "labels":
        rec["hallucinated"] = draw(st.lists(st.booleans() | JUNK, max_size=4))
    else:
        rec[draw(st.text(max_size=6))] = draw(JUNK)


def _serialize(records: list, as_array: bool) -> bytes:
    if as_array:
        text = json.dumps(records, indent=1)
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
    return text.replace(json.dumps(HUGE), "9" * 5000).encode("utf-8", errors="surrogatepass")


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["cut", "insert", "encoding", "crlf", "blank", "dup_line", "nest", "bom"]))
    pos = draw(st.integers(0, len(data)))
    if kind == "cut":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=6)) + data[pos:]
    if kind == "encoding":
        text = data.decode("utf-8", errors="surrogateescape")
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig"]))
        return text.encode(codec, errors="replace")
    if kind == "crlf":
        return data.replace(b"\n", b"\r\n")
    if kind == "blank":
        return data[:pos] + b"\n  \n" + data[pos:]
    lines = data.split(b"\n")
    j = draw(st.integers(0, len(lines) - 1))
    if kind == "dup_line":
        lines.insert(j, lines[j])
    elif kind == "nest":
        depth = draw(st.sampled_from([10, 5000, 200_000]))
        lines[j] = b"[" * depth + b"]" * depth
    else:
        return b"\xef\xbb\xbf" + data
    return b"\n".join(lines)


@st.composite
def cases(draw) -> dict:
    labelled = draw(st.booleans())
    as_array = draw(st.integers(0, 4)) == 0  # mostly JSONL, some `.json` arrays
    tasks = draw(st.lists(st.sampled_from(TASKS), min_size=1, max_size=5))
    records = [_record(task, i, labelled) for i, task in enumerate(tasks)]
    for _ in range(draw(st.integers(0, 4))):
        draw(record_mutation(records))
    data = _serialize(records, as_array)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # most files keep their bytes: record-level causes
        data = draw(byte_mutation(data))
    return {"labelled": labelled, "suffix": ".json" if as_array else ".jsonl", "data": data}


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case took over {CASE_SECONDS} s")


def _check_accepted(records: list[dict], require_labels: bool) -> None:
    """The data contract, checked without the loader's code."""
    ids = [r["id"] for r in records]
    assert records and len(set(ids)) == len(ids)
    for r in records:
        assert r["task"] in TASKS
        texts = ["id", "image", "caption"] if r["task"] == "hallucination" else ["id", "image", "context", "claim"]
        for key in texts:
            assert isinstance(r[key], str) and r[key].strip() and "\x00" not in r[key]
            assert not re.search(r"<\|[a-z_]+\|>", r[key])
            r[key].encode("utf-8")  # no lone surrogates
        assert os.path.isabs(r["image"]) and os.path.isfile(r["image"])
        with Image.open(r["image"]) as im:
            assert im.format in ("PNG", "JPEG") and im.size[0] * im.size[1] <= 64_000_000
            assert to_rgb(im).mode == "RGB"
        if r["task"] == "hallucination":
            opts = r["options"]
            assert opts and all(isinstance(o, str) and o.strip() for o in opts) and len(set(opts)) == len(opts)
            assert not any(re.search(r"<\|[a-z_]+\|>", o) for o in opts)
            labels = r["hallucinated"]
            assert (labels is None and not require_labels) or (
                isinstance(labels, list) and len(labels) == len(opts) and all(isinstance(x, bool) for x in labels))
        else:
            assert (r["label"] is None and not require_labels) or isinstance(r["label"], bool)


def _check_error(message: str, path: Path) -> str:
    """Assert `message` is `path[:LINE]: <a specific cause>`; return the cause's kind (for the statistics)."""
    assert message.startswith(f"{path}:"), message[:300]
    rest = message[len(str(path)) + 1:]
    rest = re.sub(r"^\d+:", "", rest)
    assert rest.startswith(" ") and _CAUSE.fullmatch(rest[1:]), f"not a specific cause: {message[:300]!r}"
    return next(c for c in CAUSES if re.fullmatch(c, rest[1:], re.S))[:30]


def _load(path: Path, require_labels: bool) -> str | list[dict]:
    try:
        records = load_jsonl(path, require_labels=require_labels)
        event("accepted" + (" (labels required)" if require_labels else ""))
        return records
    except DataError as err:
        event("refused: " + _check_error(str(err), path))
        return str(err)


def _validate(path: Path, *flags: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["data", "validate", *flags, str(path)])
    return code, out.getvalue(), err.getvalue()


def _check_case(case: dict, root: Path) -> None:
    for name, data in IMAGES.items():
        (root / name).write_bytes(data)
    (root / "sub").mkdir()
    path = root / f"data{case['suffix']}"
    path.write_bytes(case["data"])
    for require_labels, flags in ((False, ()), (True, ("--labels",))):
        loaded = _load(path, require_labels)
        if isinstance(loaded, list):
            _check_accepted(loaded, require_labels)
        code, out, err = _validate(path, *flags)
        assert code in (0, 2), (code, err[-2000:])
        if code == 0:
            assert err == "" and isinstance(loaded, list), (err, loaded)
            assert f"{path}: {len(loaded)} records read, 0 bad, {len(loaded)} good" in out
            continue
        listed = err.splitlines()
        assert listed[-1].startswith("hkd: error: ") and "bad line(s)" in listed[-1], listed[-1]
        assert isinstance(loaded, str) and listed[0] == loaded.split("\n")[0], (listed[0], loaded)
        for line in listed[:-1]:
            _check_error(line, path)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG_RUN,
          suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_no_input_file_gets_past_without_a_specific_refusal(case):
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _check_case(case, Path(tmp))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_mutations_reach_both_outcomes():
    """The search is not vacuous: the unmutated files load, and a mutated one is refused."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in IMAGES.items():
            (root / name).write_bytes(data)
        for labelled in (True, False):
            path = root / f"ok{labelled}.jsonl"
            path.write_bytes(_serialize([_record(t, i, labelled) for i, t in enumerate(TASKS)], False))
            _check_accepted(load_jsonl(path, require_labels=labelled), labelled)
        bad = root / "bad.jsonl"
        bad.write_bytes(_serialize([{**_record("factuality", 1, True), "label": HUGE}], False))
        with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON: a number of more than"):
            load_jsonl(bad)
