"""`nm-onnx` command line: one subcommand per pipeline step.

Each subcommand lives in its own module under `nm_onnx.commands` and exposes
`NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`. This file only discovers them,
dispatches, and turns `NmOnnxError` into a one-line message with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from nm_onnx import __version__, commands
from nm_onnx.errors import NmOnnxError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"nm_onnx.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nm-onnx",
        description="Post-training N:M activation sparsity for ONNX language models.",
    )
    parser.add_argument("--version", action="version", version=f"nm-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except NmOnnxError as e:
        print(f"nm-onnx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nm-onnx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
