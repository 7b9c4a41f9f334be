"""The run's result table: `report.json` (machine-readable) and `report.md` (for people)."""

from __future__ import annotations

import json
from pathlib import Path

TASKS = ("hallucination", "factuality")
COLUMNS = ("f1", "accuracy", "auroc", "ece")


def write_report(run_dir: Path, rows: dict[str, dict]) -> dict:
    """Per row (stage) and task: test f1, accuracy, auroc, ece; plus params and inference samples/s.
    The last stage gets a second row, `+shift`, scored with its calibrated mapping shift."""
    table = {name: _row(row, row["test"]) for name, row in rows.items()}
    if rows:
        last = list(rows)[-1]
        table[f"{last}+shift"] = _row(rows[last], rows[last]["test_shift"])
    report = {"rows": table}
    write_json(run_dir, report)
    (run_dir / "report.md").write_text(markdown_table(report))
    return report


def write_json(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))


def final_row(report: dict) -> dict:
    """The method's result: the last row (the final stage scored with its mapping shift)."""
    return report["rows"][list(report["rows"])[-1]]


def _row(row: dict, metrics: dict) -> dict:
    return {"level": row["level"], "params": row["params"], "samples_per_s": row["samples_per_s"],
            **{task: {c: metrics.get(f"{task}/{c}") for c in COLUMNS} for task in TASKS}}


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
