"""Progress of long loops: a tqdm bar on a terminal, a few plain lines in a log.

tqdm redraws its bar with carriage returns; written to a file or a CI log that becomes one line of
100 KB. `progress(iterable, desc)` therefore shows tqdm only when stderr is a terminal, and otherwise
prints `desc: i/n` lines at most every LOG_INTERVAL seconds (and at the end).
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL = 30.0  # seconds between plain progress lines in a log


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """The log-file form of a progress bar: `for x in _Lines(it, desc, total)` with tqdm's used API."""

    def __init__(self, iterable, desc: str, total: int | None, unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def __iter__(self):
        last = time.monotonic()
        i = 0
        for i, x in enumerate(self.iterable, 1):
            yield x
            now = time.monotonic()
            if now - last >= LOG_INTERVAL:
                self._line(i)
                last = now
        if i and self.total and self.total > 1:
            self._line(i)

    def _line(self, i: int) -> None:
        of = f"/{self.total}" if self.total else ""
        print(f"[{self.desc}] {i}{of} {self.unit}{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **kw) -> None:
        self.postfix = " (" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"

    def close(self) -> None:
        pass


class _Silent:
    """No progress, but the bar's API (set_postfix, close), so callers need no special case."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable, desc: str = "", enabled: bool = True, total: int | None = None, unit: str = "it",
             leave: bool = False):
    """`iterable` with progress: a tqdm bar on a terminal, plain lines otherwise, nothing if not enabled."""
    if not enabled:
        return _Silent(iterable)
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave)
    return _Lines(iterable, desc, total, unit)
