"""Static checks of the nm_onnx nodes of a model, before ONNX Runtime sees it.

ORT rejects an unsupported input dtype with a generic type error from deep inside its graph
resolver; `check_model` finds those problems first and raises NmOnnxError naming the node, the op,
the input and the fix. It also checks the attributes (n, m, criterion, shift, mode, ...).
"""

from __future__ import annotations

import onnx

from nm_onnx.errors import NmOnnxError
from nm_onnx.ops import reference as ref
from nm_onnx.ops.schemas import DOMAIN, NM_MASK, NM_SPARSE_MATMUL, TOKEN_SHIFT

INPUT_NAMES = {
    TOKEN_SHIFT: ["X"],
    NM_MASK: ["X", "channel_scale"],
    NM_SPARSE_MATMUL: ["X", "B", "channel_scale", "shift_bias", "bias"],
}
CPU_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
CUDA_TYPES = CPU_TYPES | {onnx.TensorProto.BFLOAT16}


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types are not checked
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def check_model(model: onnx.ModelProto, cuda: bool = False) -> None:
    """Raise NmOnnxError for the first nm_onnx node with a bad dtype or attribute."""
    types = _known_types(model)
    allowed = CUDA_TYPES if cuda else CPU_TYPES
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        op = node.op_type
        label = f"{op} (node '{node.name}')"
        if op not in INPUT_NAMES:
            raise NmOnnxError(f"{label}: unknown nm_onnx op; use TokenShift, NMMask or NMSparseMatMul")
        for name, value in zip(INPUT_NAMES[op], node.input):
            t = types.get(value)
            if value and t is not None and t not in allowed:
                dt = onnx.helper.tensor_dtype_to_np_dtype(t) if t != onnx.TensorProto.BFLOAT16 else "bfloat16"
                hint = "float32 or float16" + (" or bfloat16" if cuda else " (bfloat16 runs on CUDA only)")
                raise NmOnnxError(f"{label}: input {name} ('{value}') has dtype {dt}; cast it to {hint}")
        a = _attrs(node)
        if op in (NM_MASK, NM_SPARSE_MATMUL):
            if "n" not in a or "m" not in a:
                raise NmOnnxError(f"{label}: attributes n and m are required (e.g. n=8, m=16 for 8:16)")
            ref.check_pattern(label, a["n"], a["m"])
        checks = {
            "criterion": ref.CRITERIA,
            "shift": ref.SHIFTS,
            "mode": ref.SHIFT_MODES,
        }
        for attr, choices in checks.items():
            if attr in a and ref._text(a[attr]) not in choices:
                raise NmOnnxError(
                    f"{label}: attribute {attr}={ref._text(a[attr])!r} is unknown; use one of {choices}"
                )
        if "variance_correction" in a and a["variance_correction"] not in (0, 1):
            raise NmOnnxError(
                f"{label}: attribute variance_correction={a['variance_correction']} must be 0 or 1"
            )
