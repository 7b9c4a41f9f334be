"""The run's result: `report.json` (machine-readable) and `report.md`, a page that reads on its own.

`report.md` is rendered from files inside the run dir only (`report.json`, `run.json`, `stages/*.json`,
`plots/*.png`), with links relative to it, so `hkd report RUN_DIR` renders the same page for a run dir copied
from another machine. Every macro-F1, accuracy and AUROC carries a 95% bootstrap interval over the test records,
and the claim is checked with paired bootstraps (`orchestrator.report.stats`), because at the test sizes a run has,
gaps of 0.1–0.2 in macro-F1 are often the draw of the records rather than the models.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.cluster.machine import describe, probe
from orchestrator.report import stats
from orchestrator.report.stage_result import StageResult
from workers.inference.calibration import sigmoid

TASKS = ("hallucination", "factuality")
COLUMNS = ("f1", "accuracy", "auroc", "ece")
LOWER_IS_BETTER = {"ece"}
PLOTS = (("table_bars", "ablation.png", "Test macro-F1 per row"),
         ("training_curves", "training_curves.png", "Training curves per stage (loss terms; teacher wait)"),
         ("reliability", "reliability.png", "Reliability of the final model before and after the mapping shift"),
         ("confusion", "confusion.png", "Confusion matrices of the final model (shifted decisions)"),
         ("ablation_parts", "ablation_parts.png", "Ablation: test macro-F1 with each part switched off"))


def write_report(run_dir: Path, rows: dict[str, StageResult]) -> dict:
    """Per row (stage) and task: test f1, accuracy, auroc, ece (the first three with their 95% bootstrap interval
    under `interval` when the stage kept its test decisions); plus params, inference samples/s and the model dir;
    `types`, the scores per benchmark type when the test records carry facts (`workers.inference.type_scores`).
    The last stage gets a second row, `+shift`, scored with its calibrated mapping shift; `claims` holds the
    paired tests behind "The claim, checked". Writes report.json and report.md (rendered again by
    `render_markdown` once the plots exist)."""
    table = {name: _row(row, row.test, run_dir, row.test_types, _decisions(row, shift=False))
             for name, row in rows.items()}
    if rows:
        last = list(rows)[-1]
        table[f"{last}+shift"] = _row(rows[last], rows[last].test_shift, run_dir,
                                       rows[last].test_shift_types, _decisions(rows[last], shift=True))
    report = {"rows": table, "chance": chance_levels(rows), "bootstrap": bootstrap_settings(rows),
              "claims": claims(rows)}
    write_json(run_dir, report)
    render_markdown(run_dir)
    return report


def write_json(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))


def final_row(report: dict) -> dict:
    """The method's result: the last row (the final stage scored with its mapping shift)."""
    return report["rows"][list(report["rows"])[-1]]


def _row(row: StageResult, metrics: dict, run_dir: Path, types: dict | None, decisions: dict | None) -> dict:
    out = {"level": row.level, "params": row.params, "samples_per_s": row.samples_per_s,
           **{task: {c: metrics.get(f"{task}/{c}") for c in COLUMNS} for task in TASKS}}
    for task, (target, prob, records) in (decisions or {}).items():
        if task in out:
            out[task]["interval"] = {m: stats.interval(target, prob, records, m).as_list() for m in stats.METRICS}
    if row.model_dir:
        out["model_dir"] = _relative(Path(row.model_dir), run_dir)
    if types:
        out["types"] = types
    return out


def _decisions(row: StageResult, shift: bool) -> dict[str, tuple[np.ndarray, np.ndarray, list]]:
    """Per task, a stage's labelled test decisions: (targets, P(positive), record id of each), without or with
    the stage's own mapping shift; {} for a stage that kept none. A stage recorded before record ids were kept
    counts each decision as its own record."""
    units = row.test_units
    if not units:
        return {}
    tasks, target = np.array(units["task"]), np.array(units["target"], dtype=int)
    offsets = (row.shift or {}).get("offsets", {}) if shift else {}
    margin = np.array(units["margin"], dtype=float) + np.array([offsets.get(t, 0.0) for t in tasks.tolist()])
    records = np.array(units.get("record_id") or [f"#{i}" for i in range(len(target))])
    out = {}
    for task in TASKS:
        sel = (tasks == task) & (target >= 0)
        if sel.any():
            out[task] = (target[sel], sigmoid(margin[sel]), records[sel].tolist())
    return out


def bootstrap_settings(rows: dict[str, StageResult]) -> dict:
    """How the intervals were drawn, for report.json and the report's note."""
    units = [r.test_units for r in rows.values() if r.test_units]
    unit = "record" if units and all(u.get("record_id") for u in units) else "decision"
    return {"level": stats.LEVEL, "resamples": stats.RESAMPLES, "seed": stats.SEED, "unit": unit}


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def chance_levels(rows: dict[str, StageResult]) -> dict[str, dict]:
    """Per task, what a guess that ignores the input scores on this test set: macro-F1 and AUROC 0.5 (a random
    guess at the label rates), accuracy of always answering the majority class, and the positive rate."""
    units = next((r.test_units for r in rows.values() if r.test_units), None)
    out = {}
    for task in TASKS:
        targets = [t for k, t in zip(units["task"], units["target"]) if k == task] if units else []
        if targets:
            p = sum(targets) / len(targets)
            out[task] = {"f1": 0.5, "accuracy": max(p, 1 - p), "auroc": 0.5, "ece": None, "positive_rate": p,
                         "n": len(targets)}
    return out


def machine() -> dict:
    """What the run ran on, for the report: with `probe`, the one-second speed probe (`orchestrator.cluster.machine`),
    since the same kind of machine runs several times slower on some days and a time means nothing without it."""
    info = {"host": platform.node(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "cpus": os.cpu_count(), "probe": probe()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - the report must not fail for want of a version string
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def markdown_table(report: dict, best: bool = True) -> str:
    """The table: a chance row when known, the best value of each column (over the model rows) in bold, each
    value with its 95% interval `[low, high]` when the row has one."""
    rows = report["rows"]
    marks = _best(rows) if best else {}
    has_dirs = any("model_dir" in r for r in rows.values())
    head = ("| model | " + ("model dir | " if has_dirs else "") + "params | "
            + " | ".join(f"{t[:5]} {c}" for t in TASKS for c in COLUMNS) + " | samples/s |")
    lines = [head, "|" + "---|" * (len(TASKS) * len(COLUMNS) + 3 + has_dirs)]
    for name, row in rows.items():
        cells = [_fmt(row[t][c], name in marks.get((t, c), ()), (row[t].get("interval") or {}).get(c))
                 for t in TASKS for c in COLUMNS]
        lines.append(f"| {name} | " + (f"{row.get('model_dir', '–')} | " if has_dirs else "")
                     + f"{row['params'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {row['samples_per_s']:.0f} |")
    chance = report.get("chance") or {}
    if chance:
        cells = [_fmt(chance.get(t, {}).get(c)) for t in TASKS for c in COLUMNS]
        lines.append("| *chance* | " + ("– | " if has_dirs else "") + "– | " + " | ".join(cells) + " | – |")
    return "\n".join(lines) + "\n"


def _best(rows: dict[str, dict]) -> dict[tuple[str, str], set[str]]:
    """Per (task, column), the rows holding the best value (ties all marked)."""
    marks = {}
    for t in TASKS:
        for c in COLUMNS:
            values = {name: row[t][c] for name, row in rows.items() if row[t][c] is not None and row[t][c] == row[t][c]}
            if values:
                best = (min if c in LOWER_IS_BETTER else max)(values.values())
                marks[(t, c)] = {name for name, v in values.items() if round(v, 3) == round(best, 3)}
    return marks


def _fmt(value: float | None, bold: bool = False, interval: list[float] | None = None) -> str:
    if value is None or value != value:
        return "–"
    text = f"**{value:.3f}**" if bold else f"{value:.3f}"
    if interval and not any(np.isnan(interval)):
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return text


def claims(rows: dict[str, StageResult]) -> dict[str, dict]:
    """Per task, the paired tests behind "The claim, checked" (macro-F1, every row with its own mapping shift,
    so the final model's score is its `+shift` row's): the final stage against the directly tuned stage of its
    level and against the largest directly tuned level; and each of them against a constant answer on AUROC (a
    constant score has AUROC 0.5 on every resample; a constant decision's macro-F1 is at most 0.5, below a random
    guess's, so beating it would say little)."""
    if not rows:
        return {}
    final = list(rows)[-1]
    direct = {r.level: n for n, r in rows.items() if r.kind == "direct"}  # the baselines: directly tuned
    small = direct.get(rows[final].level)
    large = max(direct.values(), key=lambda n: rows[n].params, default=None)
    against = [(role, n) for role, n in (("small", small), ("large", large)) if n and n != final]
    against = [(role, n) for i, (role, n) in enumerate(against) if n not in [m for _, m in against[:i]]]
    decisions = {n: _decisions(rows[n], shift=True) for n in [final] + [n for _, n in against]}
    out = {}
    for task in TASKS:
        if task not in decisions[final] or not all(task in d for d in decisions.values()):
            continue
        target, prob, records = decisions[final][task]
        entry = {"metric": "f1", "scored": "each row with its own mapping shift",
                 "final": {"row": final, **_scored(target, prob, records)}, "against": [], "constant": {}}
        for role, name in against:
            other = decisions[name][task][1]
            entry["against"].append({"row": name, "role": role, **_scored(target, other, records),
                                     "gain": stats.paired_gain(target, prob, other, records, "f1").as_dict()})
        constant = np.full(len(target), 0.5)
        for name in [final] + [n for _, n in against]:
            entry["constant"][name] = stats.paired_gain(target, decisions[name][task][1], constant, records,
                                                        "auroc").as_dict()
        out[task] = entry
    return out


def _scored(target: np.ndarray, prob: np.ndarray, records: list) -> dict:
    ci = stats.interval(target, prob, records, "f1")
    return {"f1": ci.value, "f1_interval": ci.as_list()}


def verdicts(report: dict) -> list[str]:
    """The claim checked in words, per task, from `claims`: the final small model against the same level tuned
    directly and against the largest directly tuned level, each gap 'better', 'worse' or 'not distinguishable at
    this test size' by its paired 95% interval; and whether any model beats a constant answer."""
    out = []
    for task, c in (report.get("claims") or {}).items():
        final = c["final"]
        sentence = (f"**{task}** (macro-F1, each model with its own mapping shift): the final model "
                    f"`{final['row']}` scores {_ci(final['f1'], final['f1_interval'])}")
        for other in c["against"]:
            gain = other["gain"]
            sentence += (f". Against the directly tuned `{other['row']}` ({_ci(other['f1'], other['f1_interval'])}): "
                         f"{_gap(gain)}: **{gain['verdict']}**")
        if any(g["verdict"] == stats.BETTER for g in c["constant"].values()):
            sentence += "." + _conclusion({o["role"]: o["gain"]["verdict"] for o in c["against"]})
        else:  # nothing here beats a guess that ignores the input: gaps in macro-F1 are how often each says yes
            g = c["constant"][final["row"]]
            sentence += (f". No model's AUROC is distinguishably above a constant answer's 0.5 (the final model's "
                         f"{0.5 + g['difference']:.3f}, difference interval [{g['interval'][0]:+.3f}, "
                         f"{g['interval'][1]:+.3f}]): this run is too short to tell, and cannot test the claim.")
        out.append(sentence)
    return out


def _conclusion(verdict: dict[str, str]) -> str:
    large, small = verdict.get("large"), verdict.get("small")
    if large == stats.BETTER:
        return " The claim holds on this run: the distilled small model beats the directly tuned large one."
    if large == stats.WORSE:
        return " The claim does not hold on this run: the directly tuned large model is better."
    if large is None:
        return "" if small is None else " (No larger directly tuned level to test the claim against.)"
    if small == stats.BETTER:
        return (" Distillation beats direct tuning of the small level; whether it beats the large one, this test "
                "size cannot tell.")
    return " Whether the claim holds, this test size cannot tell."


def _gap(gain: dict) -> str:
    return f"{gain['difference']:+.3f}, interval [{gain['interval'][0]:+.3f}, {gain['interval'][1]:+.3f}]"


def _ci(value: float, interval: list[float]) -> str:
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def render_markdown(run_dir: Path) -> str:
    """report.md from the files in `run_dir` (also for a run dir copied from elsewhere); writes and returns it."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    meta = _read(run_dir / "run.json")
    parts = [f"# Run report: {meta.get('name', run_dir.name)}", ""]
    if meta:
        parts += ["## What ran", ""] + [f"- {line}" for line in _what_ran(meta, run_dir)] + [""]
    parts += ["## Results (test split)", "",
              "Macro-F1, accuracy, AUROC: higher is better; ECE (calibration error): lower is better. The best "
              "value of each column is in **bold**. `+shift` is the final model with its mapping shift calibrated "
              "on the validation split. *chance*: a guess that ignores the input (macro-F1 and AUROC 0.5, "
              "accuracy of always answering the majority class).", "", _interval_note(report), "",
              markdown_table(report)]
    if report.get("ablation"):
        parts += ["### Ablation (final row with one part switched off)", "",
                  markdown_table({"rows": report["ablation"]}), ""]
    if type_tables(report):
        parts += [type_tables(report).strip(), ""]
    claims = verdicts(report)
    if claims:
        parts += ["## The claim, checked", "",
                  "*A smaller distilled VLM can outperform a larger VLM directly tuned on the task.*", ""]
        parts += [f"- {c}" for c in claims] + [""]
    plots = [(f, title) for _, f, title in PLOTS if (run_dir / "plots" / f).is_file()]
    if plots:
        parts += ["## Plots", ""]
        for f, title in plots:
            parts += [f"### {title}", "", f"![{title}](plots/{f})", ""]
    parts += ["## Open the runs in MLflow", "", "```", mlflow_command(meta, run_dir), "```", ""]
    if meta.get("mlflow_run_id"):
        parts += [f"Parent run `{meta['mlflow_run_id']}` in experiment `{meta.get('experiment', '')}`; "
                  "each stage is a nested run.", ""]
    text = "\n".join(parts)
    (run_dir / "report.md").write_text(text)
    return text


def _interval_note(report: dict) -> str:
    b = report.get("bootstrap")
    if not b:
        return ""
    unit = ("whole test records (a Task 1 record's options move together)" if b["unit"] == "record"
            else "single test decisions (this run's stages kept no record ids)")
    return (f"`[low, high]`: the {100 * b['level']:.0f}% bootstrap interval of the value, {b['resamples']:,} "
            f"resamples of {unit}, seed {b['seed']}; where two rows' intervals overlap, only the paired test "
            "below can say whether they differ.")


def _what_ran(meta: dict, run_dir: Path) -> list[str]:
    lines = [f"config: `{meta.get('config', '?')}`" + (f" with `{' '.join(meta['overrides'])}`"
                                                      if meta.get("overrides") else "")
             + " (as run: [config.json](config.json))"]
    if meta.get("data"):
        lines.append("data: " + "; ".join(f"{split} {n['records']} records ({', '.join(f'{t} {c}' for t, c in n['tasks'].items())})"
                                          for split, n in meta["data"].items()))
    if "seed" in meta:
        lines.append(f"seed: {meta['seed']}")
    if meta.get("stages"):
        lines.append("stages: " + " → ".join(f"`{s}`" for s in meta["stages"]))
    if meta.get("wall_s") is not None:
        speed = f" · {describe(meta['machine']['probe'])}" if (meta.get("machine") or {}).get("probe") else ""
        lines.append(f"wall time: {meta['wall_s'] / 60:.1f} min ({meta.get('started', '')} → "
                     f"{meta.get('finished', '')}){speed}")
    m = meta.get("machine") or {}
    if m:
        gpus = ", ".join(m.get("gpus") or []) or "no GPU"
        lines.append(f"machine: {m.get('host', '?')}, {m.get('cpus', '?')} CPUs, {gpus}; {m.get('os', '')}, "
                     f"Python {m.get('python', '?')}, torch {m.get('torch', '?')}, Ray {m.get('ray', '?')}")
    if m.get("probe"):
        lines.append(f"machine speed: {describe(m['probe'])} ({m['probe'].get('cpu', '?')}; probe at the start: "
                     "fp32 1,024 × 1,024 matmul on one thread for 1 s)" + _cores_used(run_dir))
    lines.append("run dir: `" + str(run_dir.resolve()) + "` (models under `models/`, logs under `logs/`)")
    return lines


def _cores_used(run_dir: Path) -> str:
    """What the run's train workers asked Ray for, from the config as run."""
    res = _read(run_dir / "config.json").get("resources") or {}
    if not res.get("num_workers"):
        return ""
    return f"; train workers: {res['num_workers']} × {res.get('cpus_per_worker', '?')} CPUs"


def mlflow_command(meta: dict, run_dir: Path) -> str:
    """`mlflow ui` for the run's store. A sqlite store beside the run dir (the default) is taken from where the run
    dir is now, so a copied run dir (with its parent's mlflow.db) opens its own copy."""
    uri = meta.get("tracking_uri") or ""
    beside = run_dir.resolve().parent / "mlflow.db"
    if (not uri or uri.startswith("sqlite:///")) and beside.is_file():  # the default store, wherever the dir is now
        uri = f"sqlite:///{beside}"
    uri = uri or f"sqlite:///{beside}"
    return f"mlflow ui --backend-store-uri {uri}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def type_tables(report: dict) -> str:
    """report.md's per-type section ('' when no row has one): Task 1 recall / specificity per hallucination
    type, Task 2 accuracy per context type and per `hard`; each header counts the test decisions behind it."""
    types = {name: row["types"] for name, row in report["rows"].items() if row.get("types")}
    halluc = {name: t["hallucination"] for name, t in types.items() if "hallucination" in t}
    fact = {name: {**t["factuality"]["type"], **{f"hard: {k}": v for k, v in t["factuality"]["hard"].items()}}
            for name, t in types.items() if "factuality" in t}
    out = "\n## Per type (test)\n" if types else ""
    if halluc:
        out += ("\nTask 1: recall on each hallucination type's options / specificity on the true options of its "
                "kind (absent and colour: object options). Header: (hallucinated / true options).\n\n"
                + _grid(halluc, lambda s: f"({s['n']} / {s['n_true']})",
                        lambda s: f"{_fmt(s['recall'])} / {_fmt(s['specificity'])}"))
    if fact:
        out += ("\nTask 2: accuracy per context type, and on claims that need the context (hard: yes) or not. "
                "Header: (claims).\n\n" + _grid(fact, lambda s: f"({s['n']})", lambda s: _fmt(s["accuracy"])))
    return out


def _grid(rows: dict[str, dict[str, dict]], count: Callable[[dict], str], cell: Callable[[dict], str]) -> str:
    """A markdown table: one line per row name, one column per group any row has."""
    cols = list(dict.fromkeys(col for groups in rows.values() for col in groups))
    first = {col: next(groups[col] for groups in rows.values() if col in groups) for col in cols}
    lines = ["| model | " + " | ".join(f"{col} {count(first[col])}" for col in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(cell(groups[col]) if col in groups else "–" for col in cols) + " |"
              for name, groups in rows.items()]
    return "\n".join(lines) + "\n"
