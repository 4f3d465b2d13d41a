#!/usr/bin/env python
"""Parity checks of a transformed model (see nm_onnx/validate.py):

    python tools/validate.py DENSE_ONNX SPARSE_ONNX --model MODEL --recipe R [--calibration DIR] [--json OUT]

Each check prints PASS/FAIL with its number; exit status 1 on any FAIL (naming the check), 2 on a
usage error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nm_onnx.validate import main

if __name__ == "__main__":
    sys.exit(main())
