"""The nm_onnx op set: TokenShift, NMMask, NMSparseMatMul (domain `nm_onnx`, version 1).

This package holds the single Python-side definition of the ops: numpy reference kernels (also as
`onnx.reference` OpRun classes), standard-ONNX function decompositions for portable models, and the
loader of the compiled C++/CUDA library. Semantics: docs/ops.md and ../shared/METHOD.md.
`function_protos` is imported on first use: building the bodies loads onnxscript (~0.7 s).
"""

from nm_onnx.ops.evaluator import REFERENCE_OPS
from nm_onnx.ops.library import library_available, library_path, register_library
from nm_onnx.ops.reference import nm_keep_mask, nm_mask, nm_sparse_matmul, token_shift
from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION
from nm_onnx.ops.validate import check_model

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "REFERENCE_OPS",
    "check_model",
    "function_protos",
    "library_available",
    "library_path",
    "nm_keep_mask",
    "nm_mask",
    "nm_sparse_matmul",
    "register_library",
    "token_shift",
]


def __getattr__(name):
    if name == "function_protos":
        from nm_onnx.ops.functions import function_protos

        return function_protos
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
