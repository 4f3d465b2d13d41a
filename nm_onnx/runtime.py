"""ONNX Runtime sessions for nm-onnx models.

`make_session` registers the nm-onnx op library whenever it is built (ORT then runs our kernels even
for nodes that also carry a model-local function), picks providers (CUDA when available, else CPU),
and fails early with a clear message when a model needs our ops, the library is missing and the model
carries no portable function bodies.
"""

from __future__ import annotations

import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError

DOMAIN = "nm_onnx"


def model_needs_ops(path: str | os.PathLike) -> tuple[bool, bool]:
    """(uses nm_onnx ops, carries model-local functions for all of them) without loading weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    used = {n.op_type for n in m.graph.node if n.domain == DOMAIN}
    if not used:
        return False, True
    funcs = {f.name for f in m.functions if f.domain == DOMAIN}
    return True, used <= funcs


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def make_session(
    path: str | os.PathLike,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    profile: bool = False,
    use_library: bool = True,
):
    """An InferenceSession for `path` with the op library registered (if built and wanted)."""
    import onnxruntime as ort

    from nm_onnx.graph.load import model_file

    path = model_file(path)
    needs, portable = model_needs_ops(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if profile:
        so.enable_profiling = True
    registered = False
    if use_library:
        from nm_onnx import ops

        if ops.library_available():
            ops.register_library(so)
            registered = True
        elif needs and not portable:
            ops.library_path()  # raises NmOnnxError naming the build command
    elif needs and not portable:
        raise NmOnnxError(
            f"{path} uses nm_onnx ops but carries no portable function bodies; "
            "load the op library or transform with --portable"
        )
    if providers is None:
        avail = available_providers()
        providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []
        providers.append("CPUExecutionProvider")
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NmOnnxError(f"onnxruntime cannot load {path}: {msg}") from None
    sess.nm_onnx_library = registered  # type: ignore[attr-defined]
    return sess


def session_dir(path: str | os.PathLike) -> Path:
    from nm_onnx.graph.load import model_file

    return model_file(path).parent
