"""`onnx.reference` OpRun classes for the nm_onnx ops, so ReferenceEvaluator runs transformed models.

Usage: `onnx.reference.ReferenceEvaluator(model, new_ops=REFERENCE_OPS)`. There is one class per op of
the table in `schemas.py`: it binds the node's inputs (None for an omitted optional one) and its
attributes (defaults filled in, required ones and choices checked with the kernels' messages) by the
table's names, and calls the numpy reference in `nm_onnx.ops.reference`.
"""

from __future__ import annotations

from onnx.reference.op_run import OpRun

from nm_onnx.ops import reference as ref
from nm_onnx.ops.schemas import (
    DOMAIN,
    NM_MASK,
    NM_SPARSE_MATMUL,
    NM_SPARSE_MATMUL_NBITS,
    SCHEMAS,
    TOKEN_SHIFT,
)

# The numpy reference of each op, called with the table's input and attribute names.
_REFERENCE = {
    TOKEN_SHIFT: lambda X, mode: ref.token_shift(X, mode),
    NM_MASK: lambda X, channel_scale, n, m, criterion: (ref.nm_mask(X, n, m, criterion, channel_scale),),
    NM_SPARSE_MATMUL: lambda X, B, channel_scale, shift_bias, bias, n, m, shift, variance_correction: (
        ref.nm_sparse_matmul(X, B, n, m, shift, variance_correction, channel_scale, shift_bias, bias),
    ),
    NM_SPARSE_MATMUL_NBITS: lambda X, B, scales, zero_points, channel_scale, shift_bias, bias, **attrs: (
        ref.nm_sparse_matmul_nbits(
            X, B, scales, zero_points, channel_scale=channel_scale, shift_bias=shift_bias, bias=bias, **attrs
        ),
    ),
}


class _NmOnnxOp(OpRun):
    op_domain = DOMAIN

    def _run(self, *inputs, **attributes):
        schema = SCHEMAS[self.op_type]  # the node's op type (OpRun property)
        values = dict.fromkeys(schema.input_names)
        values.update(zip(schema.input_names, inputs))
        values.update(schema.attribute_values(schema.name, attributes))
        return _REFERENCE[schema.name](**values)


REFERENCE_OPS = [
    type(name, (_NmOnnxOp,), {}) for name in SCHEMAS
]  # ReferenceEvaluator keys on the class name
