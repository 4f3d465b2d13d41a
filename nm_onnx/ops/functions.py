"""Standard-ONNX decompositions of the nm_onnx ops, as model-local functions (`--portable` models).

A model that carries these FunctionProtos runs in a plain onnxruntime without libnm_onnx_ops (ORT
inlines the body); with the library registered ORT runs the kernel instead. The bodies implement the
same contract as the numpy reference (docs/ops.md), computing in float32 (float64 for the mean, the
variances and the clact column norms):
- N:M selection by pairwise comparison inside each group of M: rank_j = #(strictly better) +
  #(equal with lower index), keep rank < N, NaN better than everything (IsNaN), -0 == +0 (Equal);
  this materialises [..., K/M, M, M] booleans: fine for M <= 64, slow for M = K;
- lower median by TopK (smallest (K-1)//2 + 1) with a NaN row giving NaN, -0 turned into +0;
- NMSparseMatMul sums x_tk * B[k, :] over the kept k only: a plain MatMul when B is finite (a pruned
  entry is +0 and 0 * finite adds nothing), else (an `If` on "sum(B * 0) is NaN") the kept rows of B
  are gathered per token ([T, K*N/M, O] floats), so an inf or NaN in a pruned row is never read;
- string attributes are mapped to integers with ai.onnx.ml LabelEncoder; optional inputs are detected
  with OptionalHasElement (opset 18) and read through Gemm's optional C input, so absent inputs work.

Written with onnxscript `@script` functions, checked against the opset-18 schemas when this module is
imported. The pieces the ops share (rows, optional vectors, shifts, selection, variance, the kept-rows
product) are functions of a private domain; onnxscript turns a call between script functions into a
function-call node, so `function_protos` inlines them with `onnx.inliner` and each op is one
self-contained FunctionProto; its signature is checked against the op table
(schemas.py). onnxscript expresses everything the former ONNX-text templates did (attribute references
inside Constant, string attributes with defaults, LabelEncoder, omitted optional inputs, If); it
cannot write a Loop with scan outputs, which these bodies do not need. A body's default-domain opset
is the model's (>= 18; the ai.onnx.ml import >= 2): every op used here means the same in the later
opsets, so the version is set, not converted. The caller adds both imports to the model.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper
from onnxscript import DOUBLE, FLOAT, INT64, UINT8, script
from onnxscript import opset18 as op
from onnxscript import opset21 as op21
from onnxscript.values import Opset

from nm_onnx.errors import NmOnnxError
from nm_onnx.method import VAR_EPS
from nm_onnx.ops.schemas import (
    DOMAIN,
    NM_MASK,
    NM_SPARSE_MATMUL,
    NM_SPARSE_MATMUL_NBITS,
    OPSET_VERSION,
    SCHEMAS,
    TOKEN_SHIFT,
)

MIN_OPSET = 18
NBITS_MIN_OPSET = 21  # NMSparseMatMulNBits' body reads the optional zero points with a blocked DequantizeLinear
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 2

_OPS = Opset(DOMAIN, OPSET_VERSION)
_PIECES = Opset(f"{DOMAIN}.body", 1)  # shared pieces of the bodies; inlined away by function_protos
_ml = Opset(ML_DOMAIN, ML_OPSET)

# String attributes as LabelEncoder keys, their codes in table order (schemas.py).
CRITERIA = list(SCHEMAS[NM_MASK].attribute("criterion").choices)
MODES = list(SCHEMAS[TOKEN_SHIFT].attribute("mode").choices)
SHIFTS = list(SCHEMAS[NM_SPARSE_MATMUL].attribute("shift").choices)
CRITERIA_CODES, MODE_CODES, SHIFT_CODES = (list(range(len(keys))) for keys in (CRITERIA, MODES, SHIFTS))
CLACT, MEDIAN, MEAN = CRITERIA.index("clact"), SHIFTS.index("median"), SHIFTS.index("mean")
MODE_MEDIAN = MODES.index("median")

# Constants the bodies read (onnxscript turns these module values into Constant nodes; int64 vectors are
# written as local `op.Constant(value_ints=...)`, since a module-level list would get a CastLike).
INF = float("inf")
NAN = float("nan")
ZERO_1x1 = numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero_1x1")  # Gemm wants 2-D operands
ONE64 = numpy_helper.from_array(np.array(1.0, np.float64), "one64")
VAR_EPS64 = numpy_helper.from_array(np.array(VAR_EPS, np.float64), "var_eps64")


@script(_PIECES, default_opset=op)
def rows(X):
    """X [..., K] as float32 rows X2 [T, K], with T and K as int64 [1]."""
    X32 = op.Cast(X, to=FLOAT.dtype)
    K = op.Shape(X32, start=-1)
    T = op.ReduceProd(op.Shape(X32, end=-1), keepdims=1)
    X2 = op.Reshape(X32, op.Concat(T, K, axis=0), allowzero=1)
    return X2, T, K


@script(_PIECES, default_opset=op)
def optional_vector(v, like, length, default):
    """Optional input v [length] (dtype of `like`) as float32 [length], `default` when absent; and
    whether it is present. Gemm's optional C input reads v, or nothing when v is omitted."""
    z = op.CastLike(op.Constant(value=ZERO_1x1), like)
    zeros = op.Expand(z, op.Concat(op.Constant(value_ints=[1]), length, axis=0))
    value = op.Reshape(op.Cast(op.Gemm(z, zeros, v), to=FLOAT.dtype), length, allowzero=1)
    present = op.OptionalHasElement(v)
    out = op.Where(present, value, default)
    return out, present


@script(_PIECES, default_opset=op)
def row_shifts(X2, T, K):
    """Lower median and mean of every row of float32 X2 [T, K], both float32 [T, 1]; 0 when K = 0.

    Median: TopK's (K-1)//2 + 1 smallest of the row padded with +inf, NaN when the row holds a NaN,
    -0 returned as +0. Mean: float64 sum divided by K."""
    f0 = op.Constant(value_float=0.0)
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    r = op.Max(op.Div(op.Sub(K, one), op.Constant(value_ints=[2])), zero)
    r_end = op.Add(r, one)
    pad = op.Expand(op.Constant(value_floats=[INF]), op.Concat(T, one, axis=0))
    smallest, _smallest_idx = op.TopK(op.Concat(X2, pad, axis=-1), r_end, largest=0, sorted=1, axis=-1)
    med_raw = op.Slice(smallest, r, r_end, last)
    nan_count = op.ReduceSum(op.Cast(op.IsNaN(X2), to=FLOAT.dtype), last, keepdims=1)
    med_nan = op.Where(op.Greater(nan_count, f0), op.Constant(value_float=NAN), med_raw)
    med = op.Add(op.Where(op.Greater(K, zero), med_nan, f0), f0)  # + 0 turns -0 into +0
    sum64 = op.ReduceSum(op.Cast(X2, to=DOUBLE.dtype), last, keepdims=1)
    one64 = op.Constant(value=ONE64)
    mean = op.Cast(op.Div(sum64, op.Max(op.Cast(K, to=DOUBLE.dtype), one64)), to=FLOAT.dtype)
    return med, mean


@script(_PIECES, default_opset=op)
def keep_mask(S2, T, K, n: int, m: int):
    """N:M keep mask (bool [T, K]) of float32 scores S2 [T, K] under the tie and NaN rules."""
    Mv = op.Constant(value_int=m)
    Nv = op.Constant(value_int=n)
    axis0 = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    M1 = op.Reshape(Mv, one)
    Sg = op.Reshape(S2, op.Concat(T, op.Div(K, M1), M1, axis=0), allowzero=1)
    Sa = op.Unsqueeze(Sg, last)  # entry j on axis -2
    Sb = op.Unsqueeze(Sg, op.Constant(value_ints=[-2]))  # competitor i on axis -1
    a_nan = op.IsNaN(Sa)
    b_nan = op.IsNaN(Sb)
    better = op.Or(op.Greater(Sb, Sa), op.And(b_nan, op.Not(a_nan)))
    same = op.Or(op.Equal(Sb, Sa), op.And(b_nan, a_nan))
    idx = op.Range(op.Constant(value_int=0), Mv, op.Constant(value_int=1))
    lower = op.Less(op.Unsqueeze(idx, axis0), op.Unsqueeze(idx, one))  # [j, i]: i < j
    beats = op.Or(better, op.And(same, lower))
    rank = op.ReduceSum(op.Cast(beats, to=INT64.dtype), last, keepdims=0)
    keep = op.Reshape(op.Less(rank, Nv), op.Concat(T, K, axis=0), allowzero=1)
    return keep


@script(_PIECES, default_opset=op)
def variance(X64, K64):
    """Unbiased variance of every row of float64 X64 [T, K] ([T, 1]; divisor max(K - 1, 1))."""
    last = op.Constant(value_ints=[-1])
    d = op.Sub(X64, op.ReduceMean(X64, last, keepdims=1))
    ss = op.ReduceSum(op.Mul(d, d), last, keepdims=1)
    one64 = op.Constant(value=ONE64)
    var = op.Div(ss, op.Max(op.Sub(K64, one64), one64))
    return var


@script(_PIECES, default_opset=op)
def kept_rows_matmul(Xh, keep, B32, T, K, O, n: int, m: int):
    """sum over the kept k of Xh[t, k] * B32[k, :], float32 [T, O], reading only the kept rows of B.

    NonZero lists the kept columns row by row in ascending order, exactly K/m*n per row; each token
    gathers its rows of B ([T, kept, O]) and multiplies them by its kept values."""
    kept = op.Mul(
        op.Div(K, op.Reshape(op.Constant(value_int=m), op.Constant(value_ints=[1]))), op.Constant(value_int=n)
    )
    cols = op.Gather(op.NonZero(keep), op.Constant(value_int=1), axis=0)
    idx = op.Reshape(cols, op.Concat(T, kept, axis=0), allowzero=1)
    xk = op.Unsqueeze(op.GatherElements(Xh, idx, axis=1), op.Constant(value_ints=[-2]))  # [T, 1, kept]
    z = op.Reshape(op.MatMul(xk, op.Gather(B32, idx, axis=0)), op.Concat(T, O, axis=0), allowzero=1)
    return z


@script(_OPS, default_opset=op)
def TokenShift(X, mode: str = "median"):
    X2, T, K = rows(X)
    med, mean = row_shifts(X2, T, K)
    code = _ml.LabelEncoder(
        op.Constant(value_string=mode), keys_strings=MODES, values_int64s=MODE_CODES, default_int64=0
    )
    eta2 = op.Where(op.Equal(code, op.Constant(value_int=MODE_MEDIAN)), med, mean)
    Xc = op.CastLike(op.Reshape(op.Sub(X2, eta2), op.Shape(X), allowzero=1), X)
    eta_shape = op.Concat(op.Shape(X, end=-1), op.Constant(value_ints=[1]), axis=0)
    eta = op.CastLike(op.Reshape(eta2, eta_shape, allowzero=1), X)
    return Xc, eta


@script(_OPS, default_opset=op)
def NMMask(X, channel_scale, n: int, m: int, criterion: str = "magnitude"):
    f0 = op.Constant(value_float=0.0)
    f1 = op.Constant(value_float=1.0)
    X2, T, K = rows(X)
    scale, _has_scale = optional_vector(channel_scale, X, K, f1)
    crit = _ml.LabelEncoder(
        op.Constant(value_string=criterion),
        keys_strings=CRITERIA,
        values_int64s=CRITERIA_CODES,
        default_int64=0,
    )
    X64 = op.Cast(X2, to=DOUBLE.dtype)
    col = op.Cast(
        op.Sqrt(op.ReduceSum(op.Mul(X64, X64), op.Constant(value_ints=[0]), keepdims=0)), to=FLOAT.dtype
    )
    colf = op.Where(op.Equal(crit, op.Constant(value_int=CLACT)), col, f1)
    S2 = op.Mul(op.Mul(op.Abs(X2), scale), colf)
    keep = op.Reshape(keep_mask(S2, T, K, n=n, m=m), op.Shape(X), allowzero=1)
    Y0 = op.Where(keep, X, op.CastLike(f0, X))
    # ORT's Where turns a selected -0 into +0: multiply kept -0 entries by -1 to restore the sign.
    X32 = op.Cast(X, to=FLOAT.dtype)
    neg_zero = op.And(op.Equal(X32, f0), op.Less(op.Div(f1, X32), f0))
    sign = op.Where(op.And(neg_zero, keep), op.Constant(value_float=-1.0), f1)
    Y = op.Mul(Y0, op.CastLike(sign, X))
    return Y


@script(_PIECES, default_opset=op)
def sparse_product(X, B32, channel_scale, shift_bias, bias, n: int, m: int, shift: str, variance_correction: int):
    """NMSparseMatMul's formula for X [..., K] and a float32 weight B32 [K, O] (output in X's type)."""
    f0 = op.Constant(value_float=0.0)
    f1 = op.Constant(value_float=1.0)
    X2, T, K = rows(X)
    O = op.Shape(B32, start=-1)
    scale, _has_scale = optional_vector(channel_scale, X, K, f1)
    sb, has_shift_bias = optional_vector(shift_bias, X, O, f0)
    bi, has_bias = optional_vector(bias, X, O, f0)
    med, mean = row_shifts(X2, T, K)
    code = _ml.LabelEncoder(
        op.Constant(value_string=shift), keys_strings=SHIFTS, values_int64s=SHIFT_CODES, default_int64=0
    )
    eta_mean = op.Where(op.Equal(code, op.Constant(value_int=MEAN)), mean, f0)
    eta = op.Where(op.Equal(code, op.Constant(value_int=MEDIAN)), med, eta_mean)
    Xs = op.Sub(X2, eta)
    keep = keep_mask(op.Mul(op.Abs(Xs), scale), T, K, n=n, m=m)
    Xh = op.Where(keep, Xs, f0)
    nonfinite = op.IsNaN(op.ReduceSum(op.Mul(B32, f0), keepdims=0))  # B holds an inf or a NaN
    if nonfinite:
        Z = kept_rows_matmul(Xh, keep, B32, T, K, O, n=n, m=m)
    else:
        Z = op.MatMul(Xh, B32)
    Zs = op.Where(has_shift_bias, op.Add(Z, op.Mul(eta, sb)), Z)
    K64 = op.Cast(K, to=DOUBLE.dtype)
    vx = variance(op.Cast(X2, to=DOUBLE.dtype), K64)
    vh = variance(op.Cast(Xh, to=DOUBLE.dtype), K64)
    v32 = op.Cast(op.Sqrt(op.Div(vx, op.Max(vh, op.Constant(value=VAR_EPS64)))), to=FLOAT.dtype)
    v = op.Where(op.Less(K, op.Constant(value_ints=[2])), f1, v32)
    vc = op.Equal(op.Constant(value_int=variance_correction), op.Constant(value_int=1))
    Zv = op.Where(vc, op.Mul(Zs, v), Zs)
    Zb = op.Where(has_bias, op.Add(Zv, bi), Zv)
    Y = op.CastLike(op.Reshape(Zb, op.Concat(op.Shape(X, end=-1), O, axis=0), allowzero=1), X)
    return Y


@script(_PIECES, default_opset=op)
def unpack_rows(P, width, bits: int):
    """uint8 rows P [R, W] of packed `bits`-bit values (low bits first) as float32 [R, width]."""
    four = op.Equal(op.Constant(value_int=bits), op.Constant(value_int=4))
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), op.Constant(value_int=bits)),
                     to=UINT8.dtype)  # [0, 4] or [0]
    mask = op.Cast(op.Where(four, op.Constant(value_int=15), op.Constant(value_int=255)), to=UINT8.dtype)
    q = op.BitwiseAnd(op.BitShift(op.Unsqueeze(P, op.Constant(value_ints=[-1])), shifts, direction="RIGHT"), mask)
    R = op.Shape(P, end=1)
    flat = op.Reshape(q, op.Concat(R, op.Constant(value_ints=[-1]), axis=0))
    return op.Cast(op.Slice(flat, op.Constant(value_ints=[0]), width, op.Constant(value_ints=[1])), to=FLOAT.dtype)


@script(_OPS, default_opset=op)
def NMSparseMatMul(
    X, B, channel_scale, shift_bias, bias, n: int, m: int, shift: str = "none", variance_correction: int = 0
):
    Y = sparse_product(X, op.Cast(B, to=FLOAT.dtype), channel_scale, shift_bias, bias, n=n, m=m, shift=shift,
                       variance_correction=variance_correction)
    return Y


@script(_OPS, default_opset=op21)
def NMSparseMatMulNBits(
    X, B, scales, zero_points, channel_scale, shift_bias, bias, n: int, m: int, block_size: int, bits: int = 4,
    shift: str = "none", variance_correction: int = 0
):
    O = op21.Shape(scales, start=-1)
    K = op21.Shape(B, end=1)
    q = unpack_rows(B, O, bits=bits)
    blocks = op21.Shape(scales, end=1)
    four = op21.Equal(op21.Constant(value_int=bits), op21.Constant(value_int=4))
    zp_default = op21.Expand(op21.Where(four, op21.Constant(value_float=8.0), op21.Constant(value_float=128.0)),
                           op21.Concat(blocks, O, axis=0))  # 2^(bits-1)
    # the optional uint8 zero points read through DequantizeLinear's optional zero point (blocked, opset
    # 21): (0 - zp) * -1 = zp, or 0 when omitted
    W_zp = op21.Div(op21.Add(op21.Mul(O, op21.Constant(value_int=bits)), op21.Constant(value_int=7)), op21.Constant(value_int=8))
    zp_shape = op21.Concat(blocks, W_zp, axis=0)
    zeros = op21.Cast(op21.Expand(op21.Constant(value_int=0), zp_shape), to=UINT8.dtype)
    minus1 = op21.Expand(op21.Constant(value_float=-1.0), zp_shape)
    zp_bytes = op21.Cast(op21.DequantizeLinear(zeros, minus1, zero_points, axis=0, block_size=1), to=UINT8.dtype)
    zp = op21.Where(op21.OptionalHasElement(zero_points), unpack_rows(zp_bytes, O, bits=bits), zp_default)
    block_of = op21.Div(op21.Range(op21.Constant(value_int=0), op21.Squeeze(K), op21.Constant(value_int=1)),
                      op21.Constant(value_int=block_size))
    W = op21.Mul(op21.Sub(q, op21.Gather(zp, block_of, axis=0)), op21.Gather(scales, block_of, axis=0))
    Y = sparse_product(X, W, channel_scale, shift_bias, bias, n=n, m=m, shift=shift,
                       variance_correction=variance_correction)
    return Y


_BODIES = (TokenShift, NMMask, NMSparseMatMul, NMSparseMatMulNBits)
_PIECE_FUNCTIONS = (rows, optional_vector, row_shifts, keep_mask, variance, kept_rows_matmul, sparse_product, unpack_rows)


def _check_signature(fn: onnx.FunctionProto) -> None:
    """The body's inputs, outputs and attributes (with defaults) are the op table's."""
    schema = SCHEMAS[fn.name]
    defaults = {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto}
    declared = {name: None for name in fn.attribute} | {
        k: v.decode() if isinstance(v, bytes) else v for k, v in defaults.items()
    }
    expected = {a.name: a.default for a in schema.attributes}
    if (tuple(fn.input), tuple(fn.output), declared) != (schema.input_names, schema.outputs, expected):
        raise AssertionError(
            f"the function body of {fn.name} does not match its schema in nm_onnx/ops/schemas.py"
        )


def _at_opset(fn: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    """`fn` importing the default domain at `opset` (and ai.onnx.ml): set, not converted."""
    del fn.opset_import[:]
    fn.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(ML_DOMAIN, ML_OPSET)])
    return fn


@functools.cache
def _inlined() -> tuple[bytes, ...]:
    """The bodies with the shared pieces inlined. The inliner wants one opset: the bodies are written
    at 18 (NMSparseMatMulNBits at 21, for the blocked DequantizeLinear) and held at NBITS_MIN_OPSET."""
    pieces = [_at_opset(f.to_function_proto(), NBITS_MIN_OPSET) for f in _PIECE_FUNCTIONS]
    holder = helper.make_model(
        helper.make_graph([], "holder", [], []),
        opset_imports=[helper.make_opsetid("", NBITS_MIN_OPSET), helper.make_opsetid(ML_DOMAIN, ML_OPSET)],
        functions=[_at_opset(f.to_function_proto(), NBITS_MIN_OPSET) for f in _BODIES] + pieces,
    )
    holder = onnx.inliner.inline_selected_functions(holder, [(p.domain, p.name) for p in pieces])
    for fn in holder.functions:
        _check_signature(fn)
    return tuple(fn.SerializeToString() for fn in holder.functions)


def function_protos(opset: int = MIN_OPSET) -> list[onnx.FunctionProto]:
    """The standard-ONNX decompositions of the nm_onnx ops (domain nm_onnx).

    `opset` is the model's default-domain opset (>= 18; NMSparseMatMulNBits' body needs >= 21 and is
    left out below); the model must also import ai.onnx.ml (>= 2).
    """
    opset = int(opset)
    if opset < MIN_OPSET:
        raise NmOnnxError(
            f"nm_onnx function decompositions need default-domain opset >= {MIN_OPSET} (got {opset}); "
            "convert the model with onnx.version_converter or export it with opset >= 18"
        )
    protos = [onnx.FunctionProto.FromString(b) for b in _inlined()]
    return [_at_opset(fn, opset) for fn in protos if opset >= NBITS_MIN_OPSET or fn.name != NM_SPARSE_MATMUL_NBITS]
