"""What `hkd` prints: its own lines on the console, everything else in a log file.

A command runs inside `captured(log_dir, verbose)`: file descriptors 1 and 2 of the process (and so of every
process it starts: Ray's raylet, GCS, dashboard, workers, whose output Ray also forwards to the driver) point
at `<log dir>/hkd.log`, so Ray's and the libraries' output (worker stdout/stderr, Ray Data progress, weight
loading bars, warnings, tracebacks) lands there. hkd's own lines go through `say`, which writes to the console
the command was started on (and to the log). `verbose` tees the log to the console as well.

A failure inside the block leaves its traceback in the log; the CLI prints the root cause and `log_path()`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOG_NAME = "hkd.log"


class _State:
    out: TextIO | None = None  # the console hkd's own lines go to (None: sys.stdout, nothing captured)
    tty = False  # whether that console is a terminal (live bars) rather than a file or pipe (timed lines)
    log: TextIO | None = None
    log_path: Path | None = None
    verbose = False


_state = _State()
_lock = threading.Lock()


def say(message: str = "", err: bool = False) -> None:
    """One of hkd's own lines: to the console, and to the log (when captured) so the log reads in order."""
    with _lock:
        out = _state.out or (sys.stderr if err else sys.stdout)
        out.write(message + "\n")
        out.flush()
        if _state.log is not None:
            _state.log.write(message + "\n")
            _state.log.flush()


def console() -> TextIO:
    """The stream hkd's own output goes to (live bars draw on it)."""
    return _state.out or sys.stderr


def is_tty() -> bool:
    return (_state.tty if _state.out is not None else sys.stderr.isatty()) and not os.environ.get("CI")


def log_path() -> Path | None:
    """The log file of the running (or last) captured command."""
    return _state.log_path


def log_dir() -> Path | None:
    return _state.log_path.parent if _state.log_path else None


@contextmanager
def captured(directory: Path, verbose: bool = False) -> Iterator[Path]:
    """Route fds 1 and 2 into `<directory>/hkd.log` for the block (also to the console when `verbose`).
    Nested use keeps the outer capture. Yields the log's path."""
    if _state.out is not None:
        yield _state.log_path
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOG_NAME
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    tty = os.isatty(saved[0])
    log = open(path, "a", buffering=1)
    log.write(f"==== hkd {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})\n")
    tee = None
    if verbose:  # a pipe whose reader copies everything to the log and the console
        read_fd, write_fd = os.pipe()
        tee = threading.Thread(target=_tee, args=(read_fd, log, os.dup(saved[1])), daemon=True)
        tee.start()
        target = write_fd
    else:
        target = log.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    if verbose:
        os.close(write_fd)
    # hkd's lines go where stdout went: the original fd 1, or the stream object that stands in for it (pytest's
    # capsys, an embedding program), which the fd redirection does not touch.
    _state.out = os.fdopen(os.dup(saved[0]), "w", buffering=1) if _fd_backed(sys.stdout, 1) else sys.stdout
    tty = tty and _fd_backed(sys.stdout, 1)
    _state.tty, _state.log, _state.log_path, _state.verbose = tty, log, path, verbose
    try:
        yield path
    except BaseException:
        _log_traceback()  # the whole story, in the log (and on the console with -v)
        raise
    finally:
        _stop_ray()  # Ray's driver flushes forwarded worker lines ("[repeated 2x across cluster]") at shutdown
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        if tee is not None:
            tee.join(timeout=5)  # ends when every writer (this process, children) closed the pipe
        if _state.out is not sys.stdout:
            _state.out.close()
        _state.out, _state.log, _state.verbose = None, None, False
        log.close()


def _stop_ray() -> None:
    """Shut down the Ray this command started while its output still goes to the log; through
    `orchestrator.cluster.placement.stop_ray` when Ray was started there, which then copies the session's logs."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        placement = sys.modules.get("orchestrator.cluster.placement")  # not imported here: console stays free of Ray
        try:
            if placement is not None:
                placement.stop_ray()
            else:
                ray.shutdown()
        except Exception:  # noqa: BLE001 - the command's own outcome matters more
            _log_traceback()


def _log_traceback() -> None:
    """The current exception's traceback into fd 2, which the capture points at the log (or the -v tee):
    `sys.stderr` may be a stand-in that the fd redirection does not reach (pytest's capsys, an embedding program)."""
    sys.stderr.flush()
    data = traceback.format_exc().encode()
    while data:
        data = data[os.write(2, data):]


def _fd_backed(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def _tee(read_fd: int, log: TextIO, console_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            log.write(chunk.decode("utf-8", "replace"))
            log.flush()
            os.write(console_fd, chunk)
