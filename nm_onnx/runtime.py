"""ONNX Runtime sessions for nm-onnx models.

`make_session` registers the nm-onnx op library for every model that uses nm_onnx ops (ORT then runs
our kernels even for nodes that also carry a model-local function; dense models never load it),
picks providers (CUDA when available, else CPU), and fails early with a clear message when a model
needs our ops, the library is missing and the model carries no portable function bodies, or when an
nm_onnx node has a wrong dtype or a bad attribute (checked by nm_onnx.ops.validate before ORT sees
the model).
"""

from __future__ import annotations

import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError

DOMAIN = "nm_onnx"


def model_needs_ops(path: str | os.PathLike) -> tuple[bool, bool]:
    """(uses nm_onnx ops, carries model-local functions for all of them) without loading weights."""
    from nm_onnx.graph.load import read_proto

    return _needs_ops(read_proto(path, check_external=False))


def _needs_ops(m) -> tuple[bool, bool]:
    from nm_onnx.ops.validate import graph_nodes

    used = {n.op_type for n in graph_nodes(m.graph) if n.domain == DOMAIN}
    if not used:
        return False, True
    funcs = {f.name for f in m.functions if f.domain == DOMAIN}
    return True, used <= funcs


def check_nm_nodes(m, cuda: bool = False) -> None:
    """nm_onnx.ops.validate.check_model on a weightless skeleton of `m` (fast on a 500 MB model).

    A wrong input dtype or a bad attribute (n, m, criterion, shift, ...) then fails with our one-line
    NmOnnxError naming the node, instead of an ORT graph-resolver or kernel-constructor message.
    Initializers become typed graph inputs: dtypes and shapes still propagate, weights are not copied.
    """
    from onnx import helper

    from nm_onnx.ops.validate import check_model

    g = m.graph
    consts = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
    graph = helper.make_graph(list(g.node), g.name, list(g.input) + consts, list(g.output))
    skeleton = helper.make_model(graph, opset_imports=list(m.opset_import), ir_version=m.ir_version)
    skeleton.functions.extend(m.functions)
    check_model(skeleton, cuda=cuda)


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
    proto=None,
):
    """An InferenceSession for `path`, with the op library registered when the model uses nm_onnx ops.

    A dense model never touches the library (a broken $NM_ONNX_OPS_LIB cannot stop it); a corrupt
    model file or a missing external-data file is a one-line NmOnnxError before ORT sees it.
    `proto`: the model's ModelProto when the caller already read it (graph.load.read_proto).
    """
    import onnxruntime as ort

    from nm_onnx.graph.load import model_file, read_proto

    path = model_file(path)
    proto = proto if proto is not None else read_proto(path)
    needs, portable = _needs_ops(proto)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if profile:  # ORT writes the JSON when profiling ends; keep it out of the working directory
        import tempfile

        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "nm_onnx_profile")
    registered = False
    if use_library and needs:
        from nm_onnx import ops

        if ops.library_available():
            ops.register_library(so)
            registered = True
        elif not portable:
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
    if needs:
        check_nm_nodes(proto, cuda=any(str(p).startswith("CUDA") for p in providers))
    del proto
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises several types; one clear line instead
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NmOnnxError(f"onnxruntime cannot load {path}: {msg}") from None
    sess.nm_onnx_library = registered  # type: ignore[attr-defined]
    sess.nm_onnx_head_size = _genai_head_size(path)  # type: ignore[attr-defined]
    return sess


def _genai_head_size(path: Path) -> int | None:
    """The KV cache's head size of a GenAI directory's decoder (its graph leaves that axis symbolic)."""
    from nm_onnx import genai

    return genai.head_size(path.parent) if genai.is_genai_dir(path.parent) else None


def session_dir(path: str | os.PathLike) -> Path:
    from nm_onnx.graph.load import model_file

    return model_file(path).parent
