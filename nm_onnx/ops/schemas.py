"""The nm_onnx op set declared once: per op its inputs, outputs, attributes and dtypes per provider.

Every Python-side implementation reads this table instead of spelling the ops again: the static model
check (`validate.py`: dtypes, input counts, attributes), the numpy reference (`reference.py`: attribute
choices and messages), the `onnx.reference` OpRun classes (`evaluator.py`: defaults, required
attributes) and the standard-ONNX function bodies (`functions.py`: their signatures are compared with
this table when they are built). The C++ kernels declare the same ops in `custom_ops/`; the op tests
run every error case through both sides. Semantics: docs/ops.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto, helper

from nm_onnx.errors import NmOnnxError

DOMAIN = "nm_onnx"
OPSET_VERSION = 1

TOKEN_SHIFT = "TokenShift"
NM_MASK = "NMMask"
NM_SPARSE_MATMUL = "NMSparseMatMul"
NM_SPARSE_MATMUL_NBITS = "NMSparseMatMulNBits"
SPARSE_MATMULS = (NM_SPARSE_MATMUL, NM_SPARSE_MATMUL_NBITS)  # the fused sparse linears (float, quantized B)

# Element types of the kernels per execution provider (all inputs and outputs of a node share one,
# except inputs with a fixed `Input.dtype`: the quantized weight, its zero points and scales).
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DTYPES = {
    CPU: (TensorProto.FLOAT, TensorProto.FLOAT16),
    CUDA: (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16),
}


def dtype_name(elem_type: int) -> str:
    """numpy's name of an ONNX element type (float32, float16, bfloat16, int32, ...)."""
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def cast_hint(provider: str = CPU) -> str:
    """'float32 or float16 (bfloat16 runs on CUDA only)': what to cast an unsupported input to."""
    hint = " or ".join(dtype_name(t) for t in DTYPES[provider])
    for other, types in DTYPES.items():
        extra = [dtype_name(t) for t in types if t not in DTYPES[provider]]
        if extra:
            hint += f" ({' or '.join(extra)} runs on {other.removesuffix('ExecutionProvider')} only)"
    return hint


@dataclass(frozen=True)
class Input:
    name: str
    optional: bool = False
    what: str = ""  # for the optional 1-D vectors: what one entry is (used in shape messages)
    dtype: int | None = None  # a fixed element type (TensorProto enum); None: the node's type


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int" or "string"
    default: int | str | None = None  # None: required
    choices: tuple = ()  # allowed values; empty: any (n and m are checked by check_pattern)
    example: str = ""  # how to set a required attribute


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    attributes: tuple[Attribute, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def attribute(self, name: str) -> Attribute:
        return next(a for a in self.attributes if a.name == name)

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)

    def attribute_values(self, label: str, given: dict) -> dict:
        """All attributes of a node: `given` (name -> value, bytes for strings) checked, defaults filled."""
        values = {}
        for a in self.attributes:
            if a.name not in given:
                if a.default is None:
                    raise NmOnnxError(
                        f"{label}: attribute {a.name} is missing; set it on the node ({a.example})"
                    )
                values[a.name] = a.default
                continue
            values[a.name] = check_choice(label, a, given[a.name])
        return values


def text(value) -> str:
    """A string attribute as str (onnx hands them over as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def alternatives(choices) -> str:
    """'a', 'b' or 'c' (strings quoted, numbers not): the wording of the kernels' messages."""
    shown = [repr(c) if isinstance(c, str) else str(c) for c in choices]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def check_choice(label: str, a: Attribute, value):
    """`value` of attribute `a` (bytes or str for strings), checked against its choices."""
    value = text(value) if a.type == "string" else value
    if a.choices and value not in a.choices:
        if a.type == "string":
            raise NmOnnxError(
                f"{label}: attribute {a.name}={value!r} is unknown; use {alternatives(a.choices)}"
            )
        raise NmOnnxError(f"{label}: attribute {a.name}={value} must be {alternatives(a.choices)}")
    return value


_N = Attribute("n", "int", example="e.g. n=8, m=16 for 8:16")
_M = Attribute("m", "int", example="e.g. n=8, m=16 for 8:16")
_CHANNEL_SCALE = Input("channel_scale", optional=True, what="one factor per input feature")

SCHEMAS = {
    s.name: s
    for s in (
        OpSchema(
            TOKEN_SHIFT,
            inputs=(Input("X"),),
            outputs=("Xc", "eta"),
            attributes=(Attribute("mode", "string", "median", ("median", "mean")),),
        ),
        OpSchema(
            NM_MASK,
            inputs=(Input("X"), _CHANNEL_SCALE),
            outputs=("Y",),
            attributes=(_N, _M, Attribute("criterion", "string", "magnitude", ("magnitude", "clact"))),
        ),
        OpSchema(
            NM_SPARSE_MATMUL,
            inputs=(
                Input("X"),
                Input("B"),
                _CHANNEL_SCALE,
                Input("shift_bias", optional=True, what="column sums of B, one per output"),
                Input("bias", optional=True, what="one per output"),
            ),
            outputs=("Y",),
            attributes=(
                _N,
                _M,
                Attribute("shift", "string", "none", ("none", "median", "mean")),
                Attribute("variance_correction", "int", 0, (0, 1)),
            ),
        ),
        OpSchema(
            NM_SPARSE_MATMUL_NBITS,
            inputs=(
                Input("X"),
                Input("B", dtype=TensorProto.UINT8),
                Input("scales", dtype=TensorProto.FLOAT),
                Input("zero_points", optional=True, dtype=TensorProto.UINT8),
                _CHANNEL_SCALE,
                Input("shift_bias", optional=True, what="column sums of the dequantized weight, one per output"),
                Input("bias", optional=True, what="one per output"),
            ),
            outputs=("Y",),
            attributes=(
                _N,
                _M,
                Attribute("bits", "int", 4, (4, 8)),
                Attribute("block_size", "int", example="e.g. block_size=32, the MatMulNBits block along K"),
                Attribute("shift", "string", "none", ("none", "median", "mean")),
                Attribute("variance_correction", "int", 0, (0, 1)),
            ),
        ),
    )
}
