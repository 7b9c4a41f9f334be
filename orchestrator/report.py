"""The run's result: `report.json` (machine-readable) and `report.md`, a page that reads on its own.

`report.md` is rendered from files inside the run dir only (`report.json`, `run.json`, `stages/*.json`,
`plots/*.png`), with links relative to it, so `hkd report RUN_DIR` renders the same page for a run dir copied
from another machine.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

TASKS = ("hallucination", "factuality")
COLUMNS = ("f1", "accuracy", "auroc", "ece")
LOWER_IS_BETTER = {"ece"}
PLOTS = (("table_bars", "ablation.png", "Test macro-F1 per row"),
         ("training_curves", "training_curves.png", "Training curves per stage (loss terms; teacher wait)"),
         ("reliability", "reliability.png", "Reliability of the final model before and after the mapping shift"),
         ("confusion", "confusion.png", "Confusion matrices of the final model (shifted decisions)"),
         ("ablation_parts", "ablation_parts.png", "Ablation: test macro-F1 with each part switched off"))


def write_report(run_dir: Path, rows: dict[str, dict]) -> dict:
    """Per row (stage) and task: test f1, accuracy, auroc, ece; plus params, inference samples/s and the model dir;
    `types`, the scores per benchmark type when the test records carry facts (`workers.type_scores`).
    The last stage gets a second row, `+shift`, scored with its calibrated mapping shift. Writes report.json and
    report.md (rendered again by `render_markdown` once the plots exist)."""
    table = {name: _row(row, row["test"], run_dir, row.get("test_types")) for name, row in rows.items()}
    if rows:
        last = list(rows)[-1]
        table[f"{last}+shift"] = _row(rows[last], rows[last]["test_shift"], run_dir,
                                       rows[last].get("test_shift_types"))
    report = {"rows": table, "chance": chance_levels(rows)}
    write_json(run_dir, report)
    render_markdown(run_dir)
    return report


def write_json(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))


def final_row(report: dict) -> dict:
    """The method's result: the last row (the final stage scored with its mapping shift)."""
    return report["rows"][list(report["rows"])[-1]]


def _row(row: dict, metrics: dict, run_dir: Path, types: dict | None) -> dict:
    out = {"level": row["level"], "params": row["params"], "samples_per_s": row["samples_per_s"],
           **{task: {c: metrics.get(f"{task}/{c}") for c in COLUMNS} for task in TASKS}}
    if row.get("model_dir"):
        out["model_dir"] = _relative(Path(row["model_dir"]), run_dir)
    if types:
        out["types"] = types
    return out


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def chance_levels(rows: dict[str, dict]) -> dict[str, dict]:
    """Per task, what a guess that ignores the input scores on this test set: macro-F1 and AUROC 0.5 (a random
    guess at the label rates), accuracy of always answering the majority class, and the positive rate."""
    units = next((r["test_units"] for r in rows.values() if r.get("test_units")), None)
    out = {}
    for task in TASKS:
        targets = [t for k, t in zip(units["task"], units["target"]) if k == task] if units else []
        if targets:
            p = sum(targets) / len(targets)
            out[task] = {"f1": 0.5, "accuracy": max(p, 1 - p), "auroc": 0.5, "ece": None, "positive_rate": p,
                         "n": len(targets)}
    return out


def machine() -> dict:
    """What the run ran on, for the report."""
    info = {"host": platform.node(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "cpus": os.cpu_count()}
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
    """The table: a chance row when known, the best value of each column (over the model rows) in bold."""
    rows = report["rows"]
    marks = _best(rows) if best else {}
    has_dirs = any("model_dir" in r for r in rows.values())
    head = ("| model | " + ("model dir | " if has_dirs else "") + "params | "
            + " | ".join(f"{t[:5]} {c}" for t in TASKS for c in COLUMNS) + " | samples/s |")
    lines = [head, "|" + "---|" * (len(TASKS) * len(COLUMNS) + 3 + has_dirs)]
    for name, row in rows.items():
        cells = [_fmt(row[t][c], name in marks.get((t, c), ())) for t in TASKS for c in COLUMNS]
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


def _fmt(value: float | None, bold: bool = False) -> str:
    if value is None or value != value:
        return "–"
    return f"**{value:.3f}**" if bold else f"{value:.3f}"


def verdicts(report: dict) -> list[str]:
    """The claim checked in words, per task: the final small model against the same level tuned directly and
    against the largest directly tuned level."""
    rows = report["rows"]
    if not rows:
        return []
    final_name = list(rows)[-1]
    final = rows[final_name]
    direct = {r["level"]: n for n, r in rows.items() if n.endswith("-direct")}
    small = direct.get(final["level"])
    large = max(direct.values(), key=lambda n: rows[n]["params"], default=None)
    chance = report.get("chance") or {}
    out = []
    for t in TASKS:
        f = final[t]["f1"]
        if f is None:
            continue
        s = rows[small][t]["f1"] if small else None
        big = rows[large][t]["f1"] if large and large != small else None
        words = [f"**{t}**: the final model `{final_name}` scores macro-F1 {f:.3f}"]
        if s is not None:
            words.append(f"{_diff(f - s)} the directly tuned `{small}` ({s:.3f})")
        if big is not None:
            words.append(f"{_diff(f - big)} the directly tuned `{large}` ({big:.3f})")
        sentence = words[0] + (": " + "; ".join(words[1:]) if len(words) > 1 else "") + "."
        if s is not None and big is not None:
            if big <= s:
                sentence += (f" `{large}` is not better than `{small}` here, so there is no gap to close: this run "
                             "cannot test the claim.")
            elif f >= big:
                sentence += " The claim holds here: the distilled small model matches or beats the large one."
            elif big > s and f > s:
                sentence += (f" It closes {100 * (f - s) / (big - s):.0f}% of the gap between small and large; "
                             "the claim (small beats large) does not hold on this run.")
            else:
                sentence += " Distillation did not improve on direct tuning here; the claim does not hold on this run."
        level = chance.get(t, {}).get("f1")
        if level is not None and max(x for x in (f, s, big) if x is not None) < level + 0.05:
            sentence += f" Every model is within 0.05 of chance ({level:.2f}): this run is too short to tell."
        out.append(sentence)
    return out


def _diff(d: float) -> str:
    return f"{abs(d):.3f} {'above' if d > 0 else 'below' if d < 0 else 'level with'}" if d else "level with"


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
              "accuracy of always answering the majority class).", "", markdown_table(report)]
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
        lines.append(f"wall time: {meta['wall_s'] / 60:.1f} min ({meta.get('started', '')} → {meta.get('finished', '')})")
    m = meta.get("machine") or {}
    if m:
        gpus = ", ".join(m.get("gpus") or []) or "no GPU"
        lines.append(f"machine: {m.get('host', '?')}, {m.get('cpus', '?')} CPUs, {gpus}; {m.get('os', '')}, "
                     f"Python {m.get('python', '?')}, torch {m.get('torch', '?')}, Ray {m.get('ray', '?')}")
    lines.append("run dir: `" + str(run_dir.resolve()) + "` (models under `models/`, logs under `logs/`)")
    return lines


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
