"""Progress lines on stderr, stamped with the seconds since the run started."""

from __future__ import annotations

import sys
import time

_start = time.perf_counter()


def restart_clock() -> float:
    """Count from now (the start of a run); returns the new start, a time.perf_counter() value."""
    global _start
    _start = time.perf_counter()
    return _start


def log(msg: str) -> None:
    """A progress line on stderr with the elapsed time."""
    print(f"[{time.perf_counter() - _start:8.1f}s] {msg}", file=sys.stderr, flush=True)
