"""Load an ONNX model as onnx_ir with errors a user can act on.

External weights stay external (onnx_ir reads them lazily), so inspecting or rewriting a large
model never pulls its weights into memory. A missing file, a directory without model.onnx, a file
that is not ONNX and a truncated file each get one clear NmOnnxError.
"""

from __future__ import annotations

import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError


def model_file(path: str | os.PathLike) -> Path:
    """Accept model.onnx itself or an export directory that contains it."""
    p = Path(path)
    if not p.exists():
        raise NmOnnxError(f"'{path}' does not exist")
    if p.is_dir():
        candidates = [p / "model.onnx"] + sorted(p.glob("*.onnx"))
        for c in candidates:
            if c.is_file():
                return c
        raise NmOnnxError(f"directory '{path}' holds no .onnx model (expected model.onnx)")
    return p


def load_model(path: str | os.PathLike):
    """onnx_ir.Model from a file or export directory; external data left lazy."""
    import onnx_ir as ir

    p = model_file(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        raise NmOnnxError(f"'{p}' is empty, not an ONNX model")
    try:
        return ir.load(str(p))
    except Exception as e:  # protobuf DecodeError, truncated message, wrong file type...
        kind = type(e).__name__
        raise NmOnnxError(
            f"'{p}' is not a readable ONNX model ({kind}: {str(e).splitlines()[0] if str(e) else 'parse error'}); "
            "is it truncated or another file type? Re-export it with `nm-onnx export`"
        ) from None
