"""`onnx.reference` OpRun classes for the nm_onnx ops, so ReferenceEvaluator runs transformed models.

Usage: `onnx.reference.ReferenceEvaluator(model, new_ops=REFERENCE_OPS)`. Each class forwards to the
numpy reference in `nm_onnx.ops.reference`; attribute defaults are the op defaults of docs/ops.md.
"""

from __future__ import annotations

from onnx.reference.op_run import OpRun

from nm_onnx.ops import reference as ref
from nm_onnx.ops.schemas import DOMAIN


class TokenShift(OpRun):
    op_domain = DOMAIN

    def _run(self, x, mode="median"):
        return ref.token_shift(x, mode)


class NMMask(OpRun):
    op_domain = DOMAIN

    def _run(self, x, channel_scale=None, n=None, m=None, criterion="magnitude"):
        if n is None or m is None:
            raise ref.NmOnnxError("NMMask: attributes n and m are required (e.g. n=8, m=16)")
        return (ref.nm_mask(x, n, m, criterion, channel_scale),)


class NMSparseMatMul(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        x,
        b,
        channel_scale=None,
        shift_bias=None,
        bias=None,
        n=None,
        m=None,
        shift="none",
        variance_correction=0,
    ):
        if n is None or m is None:
            raise ref.NmOnnxError("NMSparseMatMul: attributes n and m are required (e.g. n=8, m=16)")
        return (
            ref.nm_sparse_matmul(x, b, n, m, shift, variance_correction, channel_scale, shift_bias, bias),
        )


REFERENCE_OPS = [TokenShift, NMMask, NMSparseMatMul]
