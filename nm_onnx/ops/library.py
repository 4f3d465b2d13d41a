"""Locate and register the compiled op library (custom_ops/build/libnm_onnx_ops.so).

`$NM_ONNX_OPS_LIB` overrides the location. A missing library is a user-fixable error: build it with
`make ops` (or `bash custom_ops/build.sh`).
"""

from __future__ import annotations

import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError

LIBRARY_NAME = "libnm_onnx_ops.so"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO_ROOT / "custom_ops" / "build" / LIBRARY_NAME


def _candidate() -> Path:
    env = os.environ.get("NM_ONNX_OPS_LIB")
    return Path(env) if env else DEFAULT_PATH


def library_path() -> str:
    """Path of the op library; raises NmOnnxError naming the build command when it is missing."""
    path = _candidate()
    if not path.is_file():
        origin = "$NM_ONNX_OPS_LIB" if os.environ.get("NM_ONNX_OPS_LIB") else "the default location"
        raise NmOnnxError(
            f"nm_onnx op library not found at {path} ({origin}); build it with `make ops` "
            "(or `bash custom_ops/build.sh`), or point $NM_ONNX_OPS_LIB at a built libnm_onnx_ops.so"
        )
    return str(path)


def library_available() -> bool:
    """True when the op library file exists (it is not loaded here)."""
    return _candidate().is_file()


def register_library(sess_options) -> None:
    """Register the op library with an `onnxruntime.SessionOptions` (NmOnnxError if it cannot load)."""
    path = library_path()
    try:
        sess_options.register_custom_ops_library(path)
    except Exception as e:  # noqa: BLE001 - ORT raises a bare RuntimeError/Fail for a bad file
        origin = "$NM_ONNX_OPS_LIB" if os.environ.get("NM_ONNX_OPS_LIB") else "the built library"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NmOnnxError(
            f"cannot load the nm_onnx op library {path} ({origin}): {first}; point $NM_ONNX_OPS_LIB at a "
            "libnm_onnx_ops.so built by `make ops`, or unset it"
        ) from None
