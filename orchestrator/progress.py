"""Terminal progress bars: one over a run's stages, one over the running stage's steps.

Steps happen inside Ray Train workers whose output is not a terminal, so rank 0 writes its step count
to a small file in the stage's storage (`workers.step_log`) and the driver polls it. Quiet when stderr
is not a TTY or `CI` is set.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def stage_bar(total: int) -> tqdm:
    return tqdm(total=total, desc="stages", unit="stage", disable=not enabled(), position=0)


@contextmanager
def step_bar(name: str, progress_file: Path, poll_s: float = 0.5) -> Iterator[None]:
    """Show the steps rank 0 reports in `progress_file` ({"step", "total"}) while the block runs."""
    if not enabled():
        yield
        return
    bar = tqdm(desc=name, unit="step", position=1, leave=False)
    stop = threading.Event()

    def update() -> None:
        try:
            state = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            return
        bar.total, bar.n = state["total"], state["step"]
        bar.refresh()

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
        update()
        bar.close()
