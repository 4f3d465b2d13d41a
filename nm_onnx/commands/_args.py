"""Argument types and shared options of the subcommands, checked by argparse before any slow import.

A bad number (`--warmup -1`, `--limit 0`, `--threads -2`) is an argparse error (usage line + one
message, exit 2) in milliseconds, not an error from deep inside torch or ORT after the model loaded.
"""

from __future__ import annotations

import argparse

OVERWRITE_HELP = ("replace an existing output that nm-onnx did not write (never an input); without it "
                  "only an earlier nm-onnx output of the same kind is replaced")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def at_least(low: int):
    """argparse type: an integer >= low."""

    def parse(text: str) -> int:
        v = _int(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}"
    return parse


positive = at_least(1)
non_negative = at_least(0)


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_threads(p, default=None, what: str = "ORT intra-op threads") -> None:
    shown = "onnxruntime's choice" if default is None else default
    p.add_argument("--threads", type=positive, default=default, help=f"{what} (default: {shown})")
