"""Unlabelled inputs of the distillation stages: read (`data.unlabeled` files, `data.synth.unlabeled` generated
records), given ids of their own, cleared of labels, and mixed into the distillation stages' training records.

Files go through the same loader as labelled data (the same `FILE:LINE` errors). Generated records come from
their own seed stream; those whose scene also occurs in val or test are dropped (and counted), so no held-out
scene is ever distilled on. Ids get the `unlabeled:` prefix and must differ from every training id, so a
teacher-cache key (`<record id>#<slot>|<aug_key>`) of an unlabelled input never equals a labelled one's.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.config.schema import ConfigError, RunConfig
from workers.data import synth
from workers.data.records import DataError, FileScan, load_jsonl, load_scan

ID_PREFIX = "unlabeled:"
LABEL_FIELDS = ("hallucinated", "label")


def load_unlabeled(cfg: RunConfig, run_dir: Path, splits: dict[str, list[dict]], spec: synth.SynthSpec,
                   scans: dict[str, FileScan] | None = None) -> tuple[list[dict], dict]:
    """The run's unlabelled records, ready to train on, and their counts (`records`, `dropped_overlap`: generated
    ones whose scene is in val or test). Labels are cleared unless `data.unlabeled_use` is `gold_labels`, which
    needs every record labelled. `scans` gets each file's scan by path (the run's length check reads them)."""
    gold, scans = cfg.data.unlabeled_use == "gold_labels", {} if scans is None else scans
    for path in cfg.data.unlabeled:
        scans[str(path)] = load_scan(path, **_load_args(cfg))
    loaded = [(str(path), rec) for path in cfg.data.unlabeled for rec in scans[str(path)].records]
    dropped = 0
    if cfg.data.synth.unlabeled:
        generated, dropped = generated_unlabeled(cfg, run_dir, splits["val"] + splits["test"], spec, scans)
        loaded += generated
    records = [as_unlabeled(rec, source, keep_labels=gold) for source, rec in loaded]
    check_ids(records, splits["train"])
    return records, {"records": len(records), "dropped_overlap": dropped}


def _load_args(cfg: RunConfig) -> dict:
    return {"field_map": cfg.data.field_map or None, "require_labels": cfg.data.unlabeled_use == "gold_labels",
            "default_task": cfg.data.default_task, **cfg.data.limits()}


def generated_unlabeled(cfg: RunConfig, run_dir: Path, held_out: list[dict], spec: synth.SynthSpec,
                        scans: dict[str, FileScan] | None = None) -> tuple[list[tuple[str, dict]], int]:
    """`data.synth.unlabeled` fresh records per task (generated once into `<run dir>/data/unlabeled`, from the
    run seed's `unlabeled` stream), less those whose scene occurs in `held_out`; returns them and the count
    dropped."""
    out = run_dir / "data" / "unlabeled"
    n = cfg.data.synth.unlabeled
    marker = out / "meta.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("n") != n:
        for task in synth.TASKS:
            synth.write_split(out, cfg.seed, task, "unlabeled", n, spec)
        marker.write_text(json.dumps({"seed": cfg.seed, "n": n}))
    paths = [str(out / task / "unlabeled.jsonl") for task in synth.TASKS]
    read = {p: load_scan(p, require_labels=True) for p in paths}
    if scans is not None:
        scans.update(read)
    records = [(p, rec) for p in paths for rec in read[p].records]
    kept = drop_seen(records, held_out)
    return kept, len(records) - len(kept)


def scene_key(record: dict) -> str | None:
    """A generated record's scene, independent of object order (None for records without one)."""
    scene = record.get("scene")
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        return None
    objects = sorted(json.dumps(o, sort_keys=True) for o in scene["objects"])
    return json.dumps({**scene, "objects": objects}, sort_keys=True)


def drop_seen(records: list[tuple[str, dict]], held_out: list[dict]) -> list[tuple[str, dict]]:
    """The (source, record) pairs whose scene occurs in no held-out record."""
    seen = {k for r in held_out if (k := scene_key(r)) is not None}
    return [(src, rec) for src, rec in records if scene_key(rec) not in seen]


def as_unlabeled(record: dict, source: str, keep_labels: bool = False) -> dict:
    """The record as an unlabelled input: prefixed id, labels cleared (kept for `gold_labels`), its file noted."""
    cleared = {} if keep_labels else dict.fromkeys(record.keys() & set(LABEL_FIELDS))
    return {**record, **cleared, "id": ID_PREFIX + record["id"], "unlabeled_file": source}


def check_ids(unlabeled: list[dict], train: list[dict]) -> None:
    """Refuse an unlabelled id used twice or equal to a training id: the cache would mix their answers."""
    taken = {r["id"] for r in train}
    for rec in unlabeled:
        if rec["id"] in taken:
            raise ConfigError(f"{rec['unlabeled_file']}: record id {rec['id'][len(ID_PREFIX):]!r} occurs twice among the "
                              f"unlabelled inputs (or as the training id {rec['id']!r}); ids must be unique")
        taken.add(rec["id"])


def mixed(train: list[dict], unlabeled: list[dict]) -> list[dict]:
    """Training plus unlabelled records, the unlabelled spread evenly through the training order, so that
    batches mix both and no batch is left without labelled positions when there are enough of them."""
    return spread([train, unlabeled]) if unlabeled else train


def by_task(records: list[dict]) -> list[list[dict]]:
    """Records grouped by task, in their order (the files store one task after the other)."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["task"], []).append(rec)
    return list(groups.values())


def spread(groups: list[list[dict]]) -> list[dict]:
    """The groups' records interleaved, each group spread evenly through the whole order (its own order kept)."""
    at = [((i + 0.5) / len(g), k, i) for k, g in enumerate(groups) for i in range(len(g))]
    return [groups[k][i] for _, k, i in sorted(at)]


def have_labels(cfg: RunConfig) -> bool:
    """Whether every unlabelled input carries labels (generated ones do): the "gold labels" ablation needs it."""
    try:
        for path in cfg.data.unlabeled:
            load_jsonl(path, **{**_load_args(cfg), "require_labels": True})
    except DataError:
        return False
    return True
