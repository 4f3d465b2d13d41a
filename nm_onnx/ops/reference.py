"""Numpy reference semantics of the nm_onnx ops (the oracle every other implementation is tested against).

One definition of TokenShift, NMMask, NMSparseMatMul and NMSparseMatMulNBits (METHOD.md, docs/ops.md), written for clarity:
the C++/CUDA kernels, the standard-ONNX function bodies and the PyTorch reference must agree with it,
bit for bit on keep masks. float16 inputs are computed in float32 and rounded back, like the CPU kernels.

Contract details fixed here (and in docs/ops.md):
- N:M keep mask per group of M consecutive features: rank_j = #(strictly better) + #(equal, lower index);
  keep rank < N. A NaN score is better than every number (+inf included); -0 == +0.
- scores: magnitude |x| * channel_scale (if given); clact |x| * channel_scale * colnorm_j, with
  colnorm_j = sqrt(sum_t x_tj^2) over all T rows of the call, accumulated in float64 in row order.
- median: lower median (sorted row, index (K-1)//2); NaN if the row has a NaN; -0 is returned as +0.
  mean: float64 sum in index order / K, rounded to float32. K == 0 gives eta = 0.
- variance correction: v = sqrt(var(x) / max(var(xh), 1e-9)), unbiased (K-1), float64; v = 1 when K < 2.
- NMSparseMatMul's product sums xh_tk * B[k, :] over the kept k only (IEEE on those terms), so an inf
  or NaN in a pruned row of B never reaches the output, as in the kernels, which never read those rows.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from nm_onnx.errors import NmOnnxError
from nm_onnx.method import VAR_EPS
from nm_onnx.ops.schemas import (
    CPU,
    DTYPES,
    NM_MASK,
    NM_SPARSE_MATMUL,
    NM_SPARSE_MATMUL_NBITS,
    SCHEMAS,
    TOKEN_SHIFT,
    cast_hint,
    check_choice,
    text,
)

_text = text  # a string attribute (bytes from onnx) as str

CRITERIA = SCHEMAS[NM_MASK].attribute("criterion").choices
SHIFT_MODES = SCHEMAS[TOKEN_SHIFT].attribute("mode").choices
SHIFTS = SCHEMAS[NM_SPARSE_MATMUL].attribute("shift").choices
SUPPORTED_DTYPES = tuple(helper.tensor_dtype_to_np_dtype(t) for t in DTYPES[CPU])


def check_input(op: str, name: str, x: np.ndarray, min_rank: int = 1) -> np.ndarray:
    """Validate dtype and rank of an op input; return it as a numpy array."""
    x = np.asarray(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise NmOnnxError(
            f"{op}: input {name} has dtype {x.dtype}, which is not supported; cast it to {cast_hint()}"
        )
    if x.ndim < min_rank:
        raise NmOnnxError(
            f"{op}: input {name} has rank {x.ndim}; it needs rank >= {min_rank} with features on the "
            "last axis (reshape a scalar to [1])"
        )
    return x


def check_attribute(op: str, name: str, value):
    """`value` of attribute `name` of `op`, checked against the op table (strings come back as str)."""
    return check_choice(op, SCHEMAS[op].attribute(name), value)


def check_pattern(op: str, n: int, m: int, k: int | None = None) -> None:
    """Validate an N:M pattern (and K % M == 0 when K is known)."""
    n, m = int(n), int(m)
    if m < 1 or m > 2**30:
        raise NmOnnxError(
            f"{op}: attribute m={m} is out of range; use m >= 1 (e.g. 2:4, 8:16; m = K for unstructured)"
        )
    if n < 0 or n > m:
        raise NmOnnxError(f"{op}: attribute n={n} must satisfy 0 <= n <= m={m}; e.g. n=8, m=16 for 8:16")
    if k is not None and k % m != 0:
        raise NmOnnxError(
            f"{op}: input X has K={k} features on its last axis, not a multiple of m={m}; "
            f"choose an N:M pattern whose M divides {k} or leave this layer dense"
        )


def check_vector(op: str, name: str, v, length: int) -> np.ndarray | None:
    """Validate an optional 1-D input of `op` (channel_scale, shift_bias, bias) of the given length."""
    if v is None:
        return None
    v = check_input(op, name, v)
    if v.ndim != 1 or v.shape[0] != length:
        what = SCHEMAS[op].input(name).what
        raise NmOnnxError(
            f"{op}: input {name} has shape {list(v.shape)}; it must be 1-D of length {length} ({what})"
        )
    return v.astype(np.float32)


def _rows(x: np.ndarray) -> np.ndarray:
    """Flatten [..., K] to float32 [T, K]."""
    t = int(np.prod(x.shape[:-1], dtype=np.int64))
    return np.ascontiguousarray(x.astype(np.float32, copy=False).reshape(t, x.shape[-1]))


def keep_from_scores(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M keep mask of float32 scores [T, K] under the tie rule and NaN rule."""
    t, k = scores.shape
    g = scores.reshape(t, k // m, m)
    if n == 0 or g.size == 0:
        return np.zeros(scores.shape, dtype=bool)
    nan = np.isnan(g)
    value = np.where(nan, np.float32(0), g)
    # lexsort: last key is primary. NaN first, then larger value, then (stable) lower index.
    order = np.lexsort((-value, ~nan), axis=-1)
    keep = np.zeros(g.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(t, k)


def keep_from_scores_pairwise(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Same as keep_from_scores, by the rank definition itself (slow; used to test the fast one)."""
    t, k = scores.shape
    g = scores.reshape(t, k // m, m)
    a, b = g[..., :, None], g[..., None, :]  # a: entry j, b: competitor i
    a_nan, b_nan = np.isnan(a), np.isnan(b)
    with np.errstate(invalid="ignore"):
        better = (b_nan & ~a_nan) | (b > a)
        equal = (b_nan & a_nan) | (b == a)
    lower = np.arange(m)[None, :] < np.arange(m)[:, None]  # [j, i]: i < j
    rank = better.sum(-1) + (equal & lower).sum(-1)
    return (rank < n).reshape(t, k)


def column_norms(x2: np.ndarray) -> np.ndarray:
    """clact column norms of float32 rows [T, K]: float64 sum of squares in row order, float32 result."""
    x64 = x2.astype(np.float64)
    acc = np.zeros(x2.shape[1], dtype=np.float64)
    for row in x64:  # row order, like the kernels
        acc += row * row
    return np.sqrt(acc).astype(np.float32)


def _scores(x2: np.ndarray, criterion: str, channel_scale: np.ndarray | None) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.abs(x2)
        if channel_scale is not None:
            s = s * channel_scale
        if criterion == "clact":
            s = s * column_norms(x2)
    return s.astype(np.float32, copy=False)


def nm_keep_mask(x, n: int, m: int, criterion: str = "magnitude", channel_scale=None) -> np.ndarray:
    """Boolean keep mask (same shape as x) of the N:M selection of NMMask."""
    op = NM_MASK
    x = check_input(op, "X", x)
    criterion = check_attribute(op, "criterion", criterion)
    k = x.shape[-1]
    check_pattern(op, n, m, k)
    cs = check_vector(op, "channel_scale", channel_scale, k)
    x2 = _rows(x)
    return keep_from_scores(_scores(x2, criterion, cs), int(n), int(m)).reshape(x.shape)


def nm_mask(x, n: int, m: int, criterion: str = "magnitude", channel_scale=None) -> np.ndarray:
    """NMMask: x with the entries outside the N:M keep mask set to +0 (same dtype as x)."""
    keep = nm_keep_mask(x, n, m, criterion, channel_scale)
    x = np.asarray(x)
    return np.where(keep, x, np.zeros((), dtype=x.dtype)).astype(x.dtype)


def row_shift(x2: np.ndarray, mode: str) -> np.ndarray:
    """Per-row shift eta [T] (float32) of float32 rows [T, K]: lower median or mean."""
    t, k = x2.shape
    if k == 0:
        return np.zeros(t, dtype=np.float32)
    if mode == "median":
        eta = np.sort(x2, axis=-1)[:, (k - 1) // 2]
        eta = np.where(np.isnan(x2).any(-1), np.float32(np.nan), eta)
        return (eta + np.float32(0)).astype(np.float32)  # -0 -> +0
    acc = np.zeros(t, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(k):  # index order, like the kernels
            acc += x2[:, j].astype(np.float64)
    return (acc / k).astype(np.float32)


def token_shift(x, mode: str = "median") -> tuple[np.ndarray, np.ndarray]:
    """TokenShift: (x - eta, eta) with eta [..., 1] the per-token lower median or mean."""
    op = TOKEN_SHIFT
    x = check_input(op, "X", x)
    mode = check_attribute(op, "mode", mode)
    x2 = _rows(x)
    eta = row_shift(x2, mode)
    with np.errstate(invalid="ignore", over="ignore"):
        xc = x2 - eta[:, None]
    return xc.reshape(x.shape).astype(x.dtype), eta.reshape(x.shape[:-1] + (1,)).astype(x.dtype)


def variance_scale(x2: np.ndarray, xh: np.ndarray) -> np.ndarray:
    """v_t = sqrt(var(x_t) / max(var(xh_t), 1e-9)), unbiased, float64; 1 when K < 2. Returns float32 [T]."""
    t, k = x2.shape
    if k < 2:
        return np.ones(t, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        vx = np.var(x2.astype(np.float64), axis=-1, ddof=1)
        vh = np.var(xh.astype(np.float64), axis=-1, ddof=1)
        return np.sqrt(vx / np.maximum(vh, VAR_EPS)).astype(np.float32)


def nm_sparse_matmul(
    x,
    b,
    n: int,
    m: int,
    shift: str = "none",
    variance_correction: int = 0,
    channel_scale=None,
    shift_bias=None,
    bias=None,
) -> np.ndarray:
    """NMSparseMatMul: v_t * (P(x_t - eta_t) @ B + eta_t * shift_bias) + bias (see docs/ops.md).

    The product sums over the kept entries only: an inf or NaN in a pruned row of B never reaches y.
    """
    op = NM_SPARSE_MATMUL
    x = check_input(op, "X", x)
    b = check_input(op, "B", b)
    shift = check_attribute(op, "shift", shift)
    variance_correction = check_attribute(op, "variance_correction", int(variance_correction))
    if b.ndim != 2:
        raise NmOnnxError(f"{op}: input B has rank {b.ndim}; it must be the [K, O] MatMul weight (rank 2)")
    k = x.shape[-1]
    if b.shape[0] != k:
        raise NmOnnxError(
            f"{op}: input B has shape {list(b.shape)} but X has K={k} features; B must be [K, O] = W^T"
        )
    if b.dtype != x.dtype:
        raise NmOnnxError(f"{op}: input B has dtype {b.dtype} but X has {x.dtype}; cast B to {x.dtype}")
    check_pattern(op, n, m, k)
    return _sparse_product(op, x, b, n, m, shift, variance_correction, channel_scale, shift_bias, bias)


def _sparse_product(op, x, w, n, m, shift, variance_correction, channel_scale, shift_bias, bias):
    """NMSparseMatMul's formula for X (checked) and the weight W [K, O] (any float dtype)."""
    k, o = x.shape[-1], w.shape[1]
    cs = check_vector(op, "channel_scale", channel_scale, k)
    sb = check_vector(op, "shift_bias", shift_bias, o)
    bi = check_vector(op, "bias", bias, o)
    b = w
    x2 = _rows(x)
    eta, keep, xh, v = _sparse_matmul_parts(x2, n, m, shift, variance_correction, cs)
    with np.errstate(invalid="ignore", over="ignore"):
        z = kept_rows_matmul(xh, keep, b).astype(np.float32)
        if sb is not None:
            z = z + eta[:, None] * sb
        if int(variance_correction):
            z = z * v[:, None]
        if bi is not None:
            z = z + bi
    with np.errstate(over="ignore"):
        return z.reshape(x.shape[:-1] + (o,)).astype(x.dtype)


def nm_sparse_matmul_nbits(
    x,
    b,
    scales,
    zero_points=None,
    n: int = 0,
    m: int = 1,
    bits: int = 4,
    block_size: int = 32,
    shift: str = "none",
    variance_correction: int = 0,
    channel_scale=None,
    shift_bias=None,
    bias=None,
) -> np.ndarray:
    """NMSparseMatMulNBits: NMSparseMatMul with B = the dequantized K-major weight (nm_onnx.ops.nbits).

    W[k, o] = (q[k, o] - zp[k // block_size, o]) * scales[k // block_size, o] in float32.
    """
    from nm_onnx.ops import nbits

    op = NM_SPARSE_MATMUL_NBITS
    x = check_input(op, "X", x)
    shift = check_attribute(op, "shift", shift)
    variance_correction = check_attribute(op, "variance_correction", int(variance_correction))
    bits = nbits.check_bits(op, check_attribute(op, "bits", int(bits)))
    block_size = nbits.check_block_size(op, block_size)
    k = x.shape[-1]
    check_pattern(op, n, m, k)
    o = nbits.check_kmajor(op, b, scales, zero_points, k, bits, block_size)
    w = nbits.KMajor(np.asarray(b), np.asarray(scales), None if zero_points is None else np.asarray(zero_points),
                     k, o, bits, block_size).dequantize()
    return _sparse_product(op, x, w, n, m, shift, variance_correction, channel_scale, shift_bias, bias)


def sparse_matmul_parts(x2, n, m, shift="none", variance_correction=0, channel_scale=None):
    """(eta [T], xh [T, K], v [T]) of NMSparseMatMul for float32 rows x2 [T, K] (v = 1 without correction)."""
    eta, _, xh, v = _sparse_matmul_parts(x2, n, m, shift, variance_correction, channel_scale)
    return eta, xh, v


def _sparse_matmul_parts(x2, n, m, shift, variance_correction, channel_scale):
    """(eta, keep, xh, v): sparse_matmul_parts with the keep mask [T, K]."""
    eta = np.zeros(x2.shape[0], dtype=np.float32) if shift == "none" else row_shift(x2, shift)
    with np.errstate(invalid="ignore", over="ignore"):
        xs = x2 - eta[:, None]
        keep = keep_from_scores(_scores(xs, "magnitude", channel_scale), int(n), int(m))
        xh = np.where(keep, xs, np.float32(0))
    v = variance_scale(x2, xh) if int(variance_correction) else np.ones(x2.shape[0], dtype=np.float32)
    return eta, keep, xh, v


def kept_rows_matmul(xh: np.ndarray, keep: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z[t] = sum over the kept k of xh[t, k] * B[k, :], in float64 [T, O]; pruned rows of B are not read.

    IEEE arithmetic on the kept terms only (a kept 0 times inf is NaN), like the kernels. When B is
    finite the dense product is exact (a pruned entry is +0 and 0 * finite adds nothing); otherwise
    each row multiplies its kept rows of B elementwise (no BLAS, which may skip zero factors).
    """
    b64 = b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(b64).all():
            return xh.astype(np.float64) @ b64
        z = np.empty((xh.shape[0], b.shape[1]), dtype=np.float64)
        for t, (row, kept) in enumerate(zip(xh, keep)):
            k = np.flatnonzero(kept)
            z[t] = (row[k, None].astype(np.float64) * b64[k]).sum(axis=0)
    return z
