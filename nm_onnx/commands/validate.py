"""`nm-onnx validate DENSE SPARSE --model M --recipe R`: the parity checks of tools/validate.py.

Same arguments, output and exit status (0 all pass, 1 a check failed, 2 usage error); the checks
themselves are nm_onnx/validate.py.
"""

from __future__ import annotations

NAME = "validate"
HELP = "Parity checks of a transformed model vs the PyTorch reference and the op references (PASS/FAIL each)."


def add_arguments(p):
    from nm_onnx.validate import add_arguments as validate_arguments

    validate_arguments(p)


def run(args) -> int:
    from nm_onnx.validate import run as run_validate

    return run_validate(args)
