"""Read ONNX models with errors a user can act on (the one guard every command uses).

`read_proto` parses a model file without its external weights; `load_model` gives the onnx_ir model
with external weights left lazy (inspecting or rewriting a large model never pulls its weights into
memory). Both name the problem in one NmOnnxError line: a missing file, a directory without a model,
an empty, truncated or non-ONNX file, and a model whose external-data file is missing or too short.
"""

from __future__ import annotations

import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError


def model_file(path: str | os.PathLike) -> Path:
    """Accept model.onnx itself or an export directory that contains it."""
    p = Path(path)
    if not p.exists():
        parent = p.parent
        if not parent.exists():
            raise NmOnnxError(f"'{path}' does not exist (nor does its folder '{parent}')")
        raise NmOnnxError(f"'{path}' does not exist")
    if p.is_dir():
        candidates = [p / "model.onnx"] + sorted(p.glob("*.onnx"))
        for c in candidates:
            if c.is_file():
                return c
        raise NmOnnxError(f"directory '{path}' holds no .onnx model (expected model.onnx)")
    return p


def read_proto(path: str | os.PathLike, check_external: bool = True):
    """The ModelProto of a model file or export directory, external data not loaded (but checked)."""
    import onnx

    p = model_file(path)
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        from nm_onnx.io import os_error

        raise os_error(e, p) from None
    if not head:
        raise NmOnnxError(f"'{p}' is empty, not an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, truncated message, wrong file type...
        kind = type(e).__name__
        raise NmOnnxError(
            f"'{p}' is not a readable ONNX model ({kind}: {str(e).splitlines()[0] if str(e) else 'parse error'}); "
            "is it truncated or another file type? Re-export it with `nm-onnx export`"
        ) from None
    if not proto.graph.node and not proto.graph.initializer:
        raise NmOnnxError(f"'{p}' holds no ONNX graph (an empty or foreign protobuf file)")
    if check_external:
        check_external_data(proto, p)
    return proto


def check_external_data(proto, path: Path) -> None:
    """Every external-data file the model names (initializers and Constant values) exists beside it and
    is long enough."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    need: dict[str, int] = {}
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute
                                               if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        end = (info.offset or 0) + (info.length or 0)
        need[info.location] = max(need.get(info.location, 0), end)
    for location, end in need.items():
        f = path.parent / location
        if not f.is_file():
            raise NmOnnxError(
                f"model '{path}' keeps its weights in '{location}', which is missing from '{path.parent}'; "
                "copy the model together with its data file"
            )
        size = f.stat().st_size
        if size < end:
            raise NmOnnxError(
                f"external data file '{f}' is truncated ({size} bytes, the model needs {end}); "
                "copy or export the model again"
            )


def load_model(path: str | os.PathLike):
    """onnx_ir.Model from a file or export directory; external data left lazy."""
    from onnx_ir import external_data as ir_external
    from onnx_ir import serde

    p = model_file(path)
    proto = read_proto(p)
    model = serde.deserialize_model(proto)
    ir_external.set_base_dir(model.graph, str(p.parent))
    _inline_attribute_tensors(model)
    return model


def _inline_attribute_tensors(model) -> None:
    """Read the node attribute tensors (Constant values) that live in external data into memory.

    Exports too big for optimum's post-processing keep them there. Passes, the checker and the writer
    handle external initializers only (graph.save copies those into the output's own data file); an
    attribute left external would keep the source's file name and offset, which in the output name
    its own `model.onnx_data`: wrong bytes or past its end. They are small (shapes, masks)."""
    import onnx_ir as ir

    for g in model.graphs():
        for node in g:
            for name, attr in list(node.attributes.items()):
                values = attr.value if attr.type == ir.AttributeType.TENSORS else [attr.value]
                if attr.type not in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS) or not any(
                        isinstance(t, ir.ExternalTensor) for t in values):
                    continue
                loaded = [ir.Tensor(t.numpy(), name=t.name) for t in values]
                node.attributes[name] = (ir.AttrTensors(name, loaded) if attr.type == ir.AttributeType.TENSORS
                                         else ir.AttrTensor(name, loaded[0]))
