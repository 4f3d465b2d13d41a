"""`nm-onnx` command line: one subcommand per pipeline step.

Each subcommand lives in its own module under `nm_onnx.commands` and exposes
`NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`. This file only discovers them,
dispatches, and owns the exit protocol (README "Exit status"):

  0 success; 1 a check failed (validate); 2 a usage or input error, one line saying what to do
  (argparse errors, `NmOnnxError`, OS faults such as a read-only or full disk); 3 an internal error
  (a bug: one line, the traceback saved to a file for the report); 130 / 143 interrupted by
  SIGINT / SIGTERM. Both signals are handled alike: the first one unwinds the command (staged
  outputs are removed by their `finally` blocks), further ones are ignored until that is done, and
  one line is printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import tempfile
import time
import traceback

from nm_onnx import __version__, commands
from nm_onnx.errors import NmOnnxError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not interrupt the clean-up
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"nm_onnx.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nm-onnx",
        description="Post-training N:M activation sparsity for ONNX language models.",
        epilog="exit status: 0 ok, 1 a check failed (validate), 2 usage or input error, "
               "3 internal error (a bug), 130/143 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"nm-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _bug_report(command: str, exc: BaseException) -> str:
    """Save the traceback of an internal error; returns the file's path (or '' if it cannot be saved)."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"nm-onnx-{command}-error-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"nm-onnx {__version__}: {' '.join(sys.argv)}\n\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
        return path
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    name = f"nm-onnx {args.command}"
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _on_signal)
    interrupted = False
    try:
        return int(args._run(args) or 0)
    except NmOnnxError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `nm-onnx inspect M | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        from nm_onnx.io import os_error

        print(f"{name}: error: {os_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as e:
        from nm_onnx.io import remove_live_partials

        remove_live_partials()
        interrupted = True  # keep ignoring the signals: a late second Ctrl-C must not kill the exit
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{name}: interrupted by {signal.Signals(signum).name}; partial outputs removed", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # a bug: one line and a saved traceback, not a bare dump
        if os.environ.get("NM_ONNX_DEBUG"):
            raise
        path = _bug_report(args.command, e)
        saved = f"; traceback saved to {path}" if path else ""
        print(f"{name}: internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
              f"This is a bug in nm-onnx: please report it with the command line{saved} "
              "(NM_ONNX_DEBUG=1 shows it here)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if not interrupted:
            for s, h in previous.items():
                signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
