"""The run's result table: `report.json` (machine-readable) and `report.md` (for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

TASKS = ("hallucination", "factuality")
COLUMNS = ("f1", "accuracy", "auroc", "ece")


def write_report(run_dir: Path, rows: dict[str, dict]) -> dict:
    """Per row (stage) and task: test f1, accuracy, auroc, ece; plus params and inference samples/s, and
    `types`, the scores per benchmark type when the test records carry facts (`workers.type_scores`).
    The last stage gets a second row, `+shift`, scored with its calibrated mapping shift."""
    table = {name: _row(row, row["test"], row.get("test_types")) for name, row in rows.items()}
    if rows:
        last = list(rows)[-1]
        table[f"{last}+shift"] = _row(rows[last], rows[last]["test_shift"], rows[last].get("test_shift_types"))
    report = {"rows": table}
    write_json(run_dir, report)
    (run_dir / "report.md").write_text(markdown_table(report) + type_tables(report))
    return report


def write_json(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))


def final_row(report: dict) -> dict:
    """The method's result: the last row (the final stage scored with its mapping shift)."""
    return report["rows"][list(report["rows"])[-1]]


def _row(row: dict, metrics: dict, types: dict | None) -> dict:
    return {"level": row["level"], "params": row["params"], "samples_per_s": row["samples_per_s"],
            **{task: {c: metrics.get(f"{task}/{c}") for c in COLUMNS} for task in TASKS},
            **({"types": types} if types else {})}


def markdown_table(report: dict) -> str:
    head = "| model | params | " + " | ".join(f"{t[:5]} {c}" for t in TASKS for c in COLUMNS) + " | samples/s |"
    lines = [head, "|" + "---|" * (len(TASKS) * len(COLUMNS) + 3)]
    for name, row in report["rows"].items():
        cells = [_fmt(row[t][c]) for t in TASKS for c in COLUMNS]
        lines.append(f"| {name} | {row['params'] / 1e6:.1f}M | " + " | ".join(cells)
                     + f" | {row['samples_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


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
