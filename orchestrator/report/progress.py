"""A stage's progress on hkd's console: a live bar on a terminal, otherwise a line at most every 30 s.

Steps happen inside Ray Train workers whose output is not the console, so rank 0 writes its step count, the
latest loss and validation F1 to a small file in the stage's storage (`workers.training.step_log`) and the driver polls
it. The bar draws on the console `orchestrator.report.console` keeps (not on stderr, which goes to the log).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from orchestrator.report import console

LINE_EVERY_S = 30.0  # at most one progress line per this many seconds when the console is not a terminal


def enabled() -> bool:
    return console.is_tty()


def describe(state: dict, rate: float | None) -> str:
    """`loss 0.512 · val f1 0.61 · 1.3 steps/s · ETA 1m02s` from the progress file's state."""
    parts = []
    loss = state.get("loss", state.get("loss_grounding"))
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    f1 = [v for k, v in state.items() if k.startswith("val/") and k.endswith("f1")]
    if f1:
        parts.append(f"val f1 {sum(f1) / len(f1):.3f}")
    if rate:
        parts.append(f"{rate:.2f} steps/s")
        left = (state["total"] - state["step"]) / rate
        parts.append(f"ETA {int(left // 60)}m{int(left % 60):02d}s")
    return " · ".join(parts)


@contextmanager
def step_bar(name: str, progress_file: Path, poll_s: float = 0.5, line_every_s: float = LINE_EVERY_S) -> Iterator[None]:
    """Show the steps rank 0 reports in `progress_file` ({"step", "total", "loss", "val/…"}) while the block runs."""
    live = enabled()
    bar = tqdm(desc=f"[{name}]", unit="step", file=console.console(), leave=False, dynamic_ncols=True) if live else None
    stop = threading.Event()
    seen = {"first": None, "last_line": time.monotonic(), "step": -1}

    def update(final: bool = False) -> None:
        try:
            state = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            return
        now = time.monotonic()
        if seen["first"] is None:
            seen["first"] = (now, state["step"])
        t0, s0 = seen["first"]
        rate = (state["step"] - s0) / (now - t0) if state["step"] > s0 and now > t0 else None
        if bar is not None:
            bar.total, bar.n = state["total"], state["step"]
            bar.set_postfix_str(describe(state, rate), refresh=False)
            bar.refresh()
        elif not final and now - seen["last_line"] >= line_every_s and state["step"] != seen["step"]:
            seen["last_line"], seen["step"] = now, state["step"]
            console.say(f"[{name}] step {state['step']}/{state['total']} · {describe(state, rate)}".rstrip(" ·"))

    def poll() -> None:
        while not stop.wait(poll_s):
            update()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        update(final=True)
        if bar is not None:
            bar.close()
