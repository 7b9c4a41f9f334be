import json
from pathlib import Path

import pytest
from PIL import Image

from workers.data.records import DataError, TASKS, load_jsonl, summarize, validate_files


def _png(path: Path) -> Path:
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path, format="PNG")
    return path


def _hall(i: int = 1, **kw) -> dict:
    rec = {
        "id": f"h{i}",
        "task": "hallucination",
        "image": "img/a.png",
        "caption": "a red square",
        "options": ["red", "square", "dog"],
        "hallucinated": [False, False, True],
    }
    rec.update(kw)
    return rec


def _fact(i: int = 1, **kw) -> dict:
    rec = {
        "id": f"f{i}",
        "task": "factuality",
        "image": "img/a.png",
        "context": "a photo",
        "claim": "the square is red",
        "label": True,
    }
    rec.update(kw)
    return rec


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    return tmp_path


def _write(d: Path, records: list, name: str = "data.jsonl") -> Path:
    p = d / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return p


def _error(p: Path, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load_jsonl(p, **kw)
    return str(ei.value)


def test_valid_file_both_tasks(data_dir):
    p = _write(data_dir, [_hall(1, scene="kitchen"), "", _fact(1)])
    recs = load_jsonl(p, require_labels=True)
    assert [r["task"] for r in recs] == list(TASKS)
    img = str((data_dir / "img" / "a.png").resolve())
    assert all(r["image"] == img for r in recs)
    assert recs[0]["scene"] == "kitchen"
    assert recs[0]["hallucinated"] == [False, False, True]
    assert recs[1]["label"] is True


def test_unlabelled_loads_unless_required(data_dir):
    h, f = _hall(), _fact()
    del h["hallucinated"], f["label"]
    p = _write(data_dir, [h, f])
    recs = load_jsonl(p)
    assert recs[0]["hallucinated"] is None and recs[1]["label"] is None
    assert f"{p}:1: missing field 'hallucinated'" in _error(p, require_labels=True)


def test_jpeg_accepted(data_dir):
    Image.new("RGB", (8, 8)).save(data_dir / "img" / "b.jpg", format="JPEG")
    p = _write(data_dir, [_fact(image="img/b.jpg")])
    assert load_jsonl(p)[0]["image"].endswith("b.jpg")


def test_invalid_json(data_dir):
    p = _write(data_dir, [_hall(), '{"id": "x",'])
    assert _error(p).startswith(f"{p}:2: invalid JSON")


def test_missing_field(data_dir):
    rec = _fact()
    del rec["claim"]
    p = _write(data_dir, [rec])
    assert _error(p) == f"{p}:1: missing field 'claim'"


@pytest.mark.parametrize(
    "rec, text",
    [
        (_hall(id=3), "field 'id': expected string, got number"),
        (_fact(label=1), "field 'label': expected boolean, got number"),
        (_fact(label="true"), "field 'label': expected boolean, got string"),
        (_hall(options="red"), "field 'options': expected array, got string"),
        (_hall(options=["a", "b", 3]), "field 'options[2]': expected string, got number"),
        (_hall(hallucinated=[0, 1, 0]), "field 'hallucinated[0]': expected boolean, got number"),
    ],
)
def test_wrong_type(data_dir, rec, text):
    p = _write(data_dir, [rec])
    assert _error(p) == f"{p}:1: {text}"


def test_unknown_task(data_dir):
    p = _write(data_dir, [_hall(task="vqa")])
    assert _error(p) == f"{p}:1: unknown task 'vqa' (valid: hallucination, factuality)"


def test_default_task(data_dir):
    rec = _fact()
    del rec["task"]
    p = _write(data_dir, [rec])
    assert f"{p}:1: missing field 'task'" in _error(p)
    assert load_jsonl(p, default_task="factuality")[0]["task"] == "factuality"


def test_empty_options(data_dir):
    p = _write(data_dir, [_hall(options=[], hallucinated=[])])
    assert _error(p) == f"{p}:1: field 'options' is empty"


def test_length_mismatch(data_dir):
    p = _write(data_dir, [_hall(hallucinated=[True, False])])
    assert _error(p) == f"{p}:1: field 'options' has 3 items but 'hallucinated' has 2"


def test_missing_image(data_dir):
    p = _write(data_dir, [_hall(), _fact(image="img/nope.png")])
    missing = (data_dir / "img" / "nope.png").resolve()
    assert _error(p) == f"{p}:2: image not found: {missing}"
    assert load_jsonl(p, check_images=False)[1]["image"] == str(missing)


def test_undecodable_image(data_dir):
    (data_dir / "img" / "bad.png").write_bytes(b"not an image at all")
    p = _write(data_dir, [_fact(image="img/bad.png")])
    assert _error(p).startswith(f"{p}:1: cannot decode image")


def test_truncated_image(data_dir):
    good = (data_dir / "img" / "a.png").read_bytes()
    (data_dir / "img" / "cut.png").write_bytes(good[: len(good) // 2])
    p = _write(data_dir, [_fact(image="img/cut.png")])
    assert _error(p).startswith(f"{p}:1: cannot decode image")


def test_unsupported_format(data_dir):
    Image.new("RGB", (4, 4)).save(data_dir / "img" / "c.gif", format="GIF")
    p = _write(data_dir, [_fact(image="img/c.gif")])
    assert "unsupported image format GIF" in _error(p)


def test_duplicate_id_names_first_line(data_dir):
    p = _write(data_dir, [_hall(1), _fact(1), "", _hall(1)])
    assert _error(p) == f"{p}:4: duplicate id 'h1' (first seen at line 1)"


def test_empty_file(data_dir):
    p = _write(data_dir, ["", "  "])
    assert _error(p) == f"{p}: file is empty"


def test_not_an_object(data_dir):
    p = _write(data_dir, ["[1, 2]"])
    assert _error(p) == f"{p}:1: expected a JSON object, got array"


FMAP = {"options": "choices", "hallucinated": "labels", "caption": "text"}


def _mapped(**kw) -> dict:
    rec = _hall()
    rec["choices"] = rec.pop("options")
    rec["labels"] = rec.pop("hallucinated")
    rec["text"] = rec.pop("caption")
    rec.update(kw)
    return rec


def test_field_map_reads_renamed_fields(data_dir):
    p = _write(data_dir, [_mapped(scene="park")])
    (r,) = load_jsonl(p, field_map=FMAP)
    assert r["options"] == ["red", "square", "dog"]
    assert r["hallucinated"] == [False, False, True]
    assert r["caption"] == "a red square" and r["scene"] == "park"
    assert not {"choices", "labels", "text"} & r.keys()


def test_field_map_errors_name_file_field(data_dir):
    rec = _mapped()
    del rec["labels"]
    p = _write(data_dir, [rec, _mapped(id="h2", choices=["a", 1])])
    assert _error(p, field_map=FMAP, require_labels=True) == (
        f"{p}:1: missing field 'labels' (contract field 'hallucinated')"
    )
    assert _error(p, field_map=FMAP) == (
        f"{p}:2: field 'choices[1]' (contract field 'options'): expected string, got number"
    )


def test_field_map_clash(data_dir):
    p = _write(data_dir, [_mapped(caption="other")])
    assert "clashes with contract field 'caption'" in _error(p, field_map=FMAP)


def test_summary(data_dir):
    unl = _fact(3)
    del unl["label"]
    p = _write(
        data_dir,
        [_hall(1), _hall(2, hallucinated=[True, True, True]), _fact(1), _fact(2, label=False), unl],
    )
    s = summarize(load_jsonl(p))
    assert s["hallucination"] == {
        "n": 2, "n_units": 6, "n_labelled_units": 6, "positive_share": 4 / 6
    }
    assert s["factuality"] == {"n": 3, "n_units": 3, "n_labelled_units": 2, "positive_share": 0.5}
    q = _write(data_dir, [unl], "unl.jsonl")
    assert summarize(load_jsonl(q))["factuality"]["positive_share"] is None
    text = validate_files([p, q]).summary
    assert f"{p}: 5 records" in text and "66.7% hallucinated" in text
    assert "50.0% true (of 2 labelled)" in text and "unlabelled" in text


def test_shared_image_decoded_once(data_dir):
    from workers.data.records import _image_problem

    _image_problem.cache_clear()
    load_jsonl(_write(data_dir, [_hall(i) for i in range(5)]))
    assert _image_problem.cache_info().misses == 1


def test_challenge_style_files_read_through_the_field_map(tmp_path):
    """configs/challenge.yaml reads examples/challenge/*.json (arrays, options as objects, nested context)."""
    import shutil

    from orchestrator.config.schema import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "challenge.yaml")
    fmap = cfg.data.field_map
    for split in ("train", "val", "test"):
        recs = load_jsonl(root / "examples" / "challenge" / f"{split}.json", fmap, require_labels=True)
        assert {r["task"] for r in recs} == {"hallucination", "factuality"}
        raw = {r["uid"]: r for r in json.loads((root / "examples" / "challenge" / f"{split}.json").read_text())}
        for rec in recs:
            src = raw[rec["id"]]
            if rec["task"] == "hallucination":
                assert rec["options"] == [c["phrase"] for c in src["candidates"]]
                assert rec["hallucinated"] == [c["is_hallucinated"] for c in src["candidates"]]
            else:
                assert (rec["context"], rec["claim"], rec["label"]) == (
                    src["query"]["background"], src["query"]["statement"], src["answer"])
            assert Path(rec["image"]).is_file()
        assert summarize(recs)
    # A candidate without its label is refused with the record number and the mapped path.
    bad = json.loads((root / "examples" / "challenge" / "test.json").read_text())
    del bad[1]["candidates"][0]["is_hallucinated"]
    shutil.copytree(root / "examples" / "challenge" / "images", tmp_path / "images")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json:2: missing field 'candidates\[\]\.is_hallucinated'"):
        load_jsonl(tmp_path / "bad.json", fmap, require_labels=True)
