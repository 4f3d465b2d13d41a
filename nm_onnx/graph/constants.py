"""Weight access for the passes: one weight at a time, straight from (external) data, in one read.

The passes need two constants per site that depend on the weight: the shift bias r = W·1 (column
sums of B = W^T) and the Amber / Wanda channel factors (`nm_onnx.method.channel_factors`), and
one fact about it: every value is finite (NMSparseMatMul skips pruned rows of B while the unfused
NMMask -> MatMul form multiplies them by 0, so an inf or NaN weight would make the two forms differ;
docs/ops.md). They are computed here weight by weight in ONE chunked pass over the stored bytes (external data is read
with plain file reads into a small reused buffer: no mmap, no whole-weight copy), so transforming a
13 GB model holds a few MiB per weight. The sites are independent: `site_constants_parallel` runs
them on a thread pool (numpy releases the GIL in the float work), one weight per worker.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nm_onnx.errors import NmOnnxError
from nm_onnx.method import AMBER_QUANTILES, channel_factors

CHUNK_ELEMENTS = 1 << 18  # elements per chunk of the streaming pass: float64 work set ~2 MiB (cache-sized)


def _initializer(model, name: str):
    value = model.graph.initializers.get(name)
    if value is None or value.const_value is None:
        raise NmOnnxError(f"weight initializer '{name}' has no data in the model")
    return value.const_value


def quantized_weight(model, site):
    """The MatMulNBits weight of a quantized site (`site.quant`), checked (nm_onnx.ops.nbits)."""
    from nm_onnx.ops.nbits import MatMulNBitsWeight

    q = site.quant
    zp = _initializer(model, q.zero_points).numpy() if q.zero_points else None
    w = MatMulNBitsWeight(b=_initializer(model, site.weight).numpy(), scales=_initializer(model, q.scales).numpy(),
                          zero_points=zp, k=site.k, n=site.o, bits=q.bits, block_size=q.block_size)
    w.check(f"site '{site.module}' (MatMulNBits '{site.matmul}')")
    return w


def _weight_tensor(model, site):
    """(tensor, transposed) the site computes with: the stored initializer, or for a quantized site its
    dequantization B [K, O] float32 in memory (int4 weights are an eighth of their float size)."""
    if site.quant is None:
        return _initializer(model, site.weight), site.transposed
    import onnx_ir as ir

    return ir.tensor(quantized_weight(model, site).dequantize(), name=site.weight), False


def load_weight(model, site) -> np.ndarray:
    """The site's weight W [O, K] as stored dtype (a view onto the data when possible; dequantized float32
    for a quantized site)."""
    tensor, transposed = _weight_tensor(model, site)
    array = tensor.numpy()
    return array if transposed else array.T


def _release(tensor) -> None:
    release = getattr(tensor, "release", None)
    if release is not None:
        try:
            release()
        except BufferError:  # a view is still alive (e.g. in a traceback): the GC unmaps it later
            pass


def release_weight(model, site) -> None:
    """Drop cached data of the site's weight (external tensors keep no mmap open)."""
    _release(_initializer(model, site.weight))


def _file_chunks(tensor, shape, dtype, rows: int):
    """(start row, [rows, C] chunk) of an external tensor, read with file reads into one reused buffer."""
    n_rows, n_cols = shape
    itemsize = dtype.itemsize
    buf = np.empty(rows * n_cols, dtype=dtype)
    base = tensor.offset or 0
    with open(tensor.path, "rb", buffering=0) as f:
        for start in range(0, n_rows, rows):
            count = min(rows, n_rows - start)
            view = memoryview(buf[: count * n_cols]).cast("B")
            f.seek(base + start * n_cols * itemsize)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise NmOnnxError(f"external data of '{tensor.name}' in '{tensor.path}' is truncated")
                done += got
            yield start, buf[: count * n_cols].reshape(count, n_cols)


def _row_chunks(tensor, rows: int):
    """(start row, chunk) over the stored 2-D tensor; the chunk buffer is reused, do not keep it."""
    import onnx_ir as ir

    shape = tuple(int(d) for d in tensor.shape.numpy())
    dtype = np.dtype(tensor.dtype.numpy())
    if isinstance(tensor, ir.ExternalTensor) and dtype.itemsize * 8 == tensor.dtype.bitwidth and len(shape) == 2:
        yield from _file_chunks(tensor, shape, dtype.newbyteorder("<"), rows)
        return
    array = tensor.numpy().reshape(shape)
    try:
        for start in range(0, shape[0], rows):
            yield start, array[start:start + rows]
    finally:
        del array
        _release(tensor)


def _quantile_from_histogram(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """np.quantile(..., method='linear') of the multiset {values[i] x counts[i]} (values sorted)."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    t = pos - lo
    a = values[np.searchsorted(cum, lo, side="right")]
    b = values[np.searchsorted(cum, min(lo + 1, n - 1), side="right")]
    diff = b - a
    return float(b - diff * (1 - t)) if t >= 0.5 else float(a + diff * t)  # numpy's lerp


def _fp16_histogram(bits: np.ndarray) -> np.ndarray:
    """Counts of each of the 65536 float16 bit patterns (chunked: bincount widens to int64)."""
    counts = np.zeros(65536, dtype=np.int64)
    for start in range(0, bits.size, CHUNK_ELEMENTS):
        counts += np.bincount(bits[start:start + CHUNK_ELEMENTS], minlength=65536)
    return counts


def _amber_mu_sigma_from_counts(counts: np.ndarray) -> tuple[float, float]:
    """Amber's trimmed mean/std of a float16 weight, exactly, from its 65536-bin bit histogram."""
    values = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    present = (counts > 0) & ~np.isnan(values)
    values, counts = values[present], counts[present]
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    lo, hi = (_quantile_from_histogram(values, counts, q) for q in AMBER_QUANTILES)
    inside = (values >= lo) & (values <= hi)
    v, c = values[inside], counts[inside]
    n = c.sum()
    mu = float((v * c).sum() / n)
    sigma = float(np.sqrt((c * (v - mu) ** 2).sum() / (n - 1))) if n > 1 else 1.0
    if not np.isfinite(sigma) or sigma == 0:
        sigma = 1.0
    return mu, sigma


def _amber_mu_sigma_fp16(stored: np.ndarray) -> tuple[float, float]:
    """Amber's trimmed mean/std of a float16 array (exact histogram quantiles)."""
    return _amber_mu_sigma_from_counts(_fp16_histogram(np.ascontiguousarray(stored).view(np.uint16).reshape(-1)))


class NonFiniteWeight(NmOnnxError):
    """A weight holds inf or NaN values (the message names the weight; callers add the site)."""


def _check_finite(tensor, bad: int, total: int) -> None:
    if bad:
        raise NonFiniteWeight(
            f"weight '{tensor.name}' holds {bad} non-finite value(s) (inf/NaN) of {total}; nm-onnx refuses it "
            "because the fused and unfused sparse forms would compute different results (docs/ops.md); "
            "fix the checkpoint or exclude this module in the recipe"
        )


def _one_pass(tensor, transposed: bool, channel: bool, hist: bool, need_r: bool):
    """ONE chunked float64 pass over the stored weight (raises NonFiniteWeight on inf/NaN).

    Returns (s1, s2, r, counts, O): per input channel j the sums s2_j = sum_o W[o, j]^2 (if
    `channel`) and s1_j = sum_o W[o, j] (if `hist`), r = W·1 (if `need_r`), the float16 bit
    histogram (if `hist`, Amber) and the output size O. With them,
    sum_o (W[o, j] - mu)^2 = s2_j - 2 mu s1_j + O mu^2 for the mu found afterwards from the
    histogram, so Amber's trimmed mean needs no second read of the weight.
    """
    rows_n, cols_n = (int(d) for d in tensor.shape.numpy())
    k = cols_n if transposed else rows_n
    o = rows_n if transposed else cols_n
    s1 = np.zeros(k) if hist else None  # only Amber's mean correction needs the plain sums
    s2 = np.zeros(k) if channel else None
    r = np.zeros(o) if need_r else None
    counts = np.zeros(65536, dtype=np.int64) if hist else None
    rows = max(1, CHUNK_ELEMENTS // max(1, cols_n))
    work = np.empty(rows * cols_n)  # reused: a fresh 2 MiB temporary per chunk costs more than the math
    bad = 0
    for start, chunk in _row_chunks(tensor, rows):
        finite = np.isfinite(chunk)
        if not finite.all():
            bad += int(finite.size - np.count_nonzero(finite))
        if counts is not None:
            counts += np.bincount(chunk.view(np.uint16).reshape(-1), minlength=65536)
        x = work[: chunk.shape[0] * cols_n].reshape(chunk.shape[0], cols_n)
        np.copyto(x, chunk)
        stop = start + x.shape[0]
        if transposed:  # stored W [O, K]: rows are output channels
            if r is not None:
                r[start:stop] = x.sum(axis=1)
            if s1 is not None:
                s1 += x.sum(axis=0)
            if s2 is not None:
                s2 += np.einsum("ij,ij->j", x, x)
        else:  # stored B [K, O]: rows are input channels
            if r is not None:
                r += x.sum(axis=0)
            if s1 is not None:
                s1[start:stop] = x.sum(axis=1)
            if s2 is not None:
                s2[start:stop] = np.einsum("ij,ij->i", x, x)
    _check_finite(tensor, bad, rows_n * cols_n)
    return s1, s2, r, counts, o


def tensor_constants(tensor, transposed: bool, criterion: str | None, need_r: bool):
    """(channel factors f [K] or None, r = W·1 [O] or None) of one stored weight tensor, float32.

    Always reads the weight once and raises NonFiniteWeight if it holds an inf or NaN.
    Wanda, and Amber on float16 weights, take the one-pass path (Amber's [0.5%, 99.5%] quantiles
    exactly from the float16 bit histogram); Amber on other dtypes calls
    `nm_onnx.method.channel_factors` itself (exact quantiles need the whole weight). Both agree
    with the reference to float rounding (tests/test_passes_constants.py).
    """
    fp16 = tensor.dtype.numpy() == np.float16
    factors = None
    if criterion == "amber" and not fp16:
        stored = tensor.numpy()
        try:
            finite = np.isfinite(stored)
            _check_finite(tensor, int(finite.size - np.count_nonzero(finite)), finite.size)
            del finite
            factors = channel_factors(stored if transposed else stored.T, criterion)
        finally:
            del stored
            _release(tensor)
        if not need_r:
            return factors, None
        criterion = None
    channel = criterion in ("amber", "wanda")
    s1, s2, r, counts, o = _one_pass(tensor, transposed, channel, criterion == "amber", need_r)
    if criterion == "wanda":
        factors = np.sqrt(s2).astype(np.float32)
    elif criterion == "amber":
        mu, sigma = _amber_mu_sigma_from_counts(counts)
        ss = np.maximum(s2 - 2.0 * mu * s1 + o * mu * mu, 0.0)  # sum_o (W[o, j] - mu)^2
        c = np.sqrt(ss) / sigma
        cmin = c.min()
        if not cmin > 0:
            cmin = np.finfo(np.float64).tiny
        factors = (c / cmin).astype(np.float32)
    return factors, (r.astype(np.float32) if r is not None else None)


def weight_constants(model, site, criterion: str | None, need_r: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(channel factors f [K] or None, r = W·1 [O] or None) of one site, float32, one weight read once.

    NmOnnxError naming the site if the weight holds an inf or NaN.
    """
    try:
        return tensor_constants(*_weight_tensor(model, site), criterion, need_r)
    except NonFiniteWeight as e:
        raise NmOnnxError(f"site '{site.module}': {e}") from None


def default_workers() -> int:
    """Threads for the per-weight constants: the usable cores (at most 8; NM_ONNX_THREADS overrides)."""
    env = os.environ.get("NM_ONNX_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def site_constants_parallel(model, jobs, workers: int | None = None):
    """Yield weight_constants(model, site, criterion, need_r) for each job, in order, on a thread pool.

    The weight tensors are looked up on the calling thread; each worker then reads one weight at a
    time, so at most `workers` weights are being read at once (a few MiB of buffers each).
    """
    tasks = [(s, None if s.quant else _initializer(model, s.weight), c, nr) for s, c, nr in jobs]
    workers = workers or default_workers()

    def work(task):
        site, tensor, criterion, need_r = task
        try:
            if tensor is None:  # a quantized site: dequantized on the worker
                return tensor_constants(*_weight_tensor(model, site), criterion, need_r)
            return tensor_constants(tensor, site.transposed, criterion, need_r)
        except NonFiniteWeight as e:
            raise NmOnnxError(f"site '{site.module}': {e}") from None

    if workers <= 1 or len(tasks) <= 1:
        yield from map(work, tasks)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nm-onnx-constants") as pool:
        yield from pool.map(work, tasks)


def shift_times_weight(model, site, shift: np.ndarray) -> np.ndarray:
    """s · W^T [O] for a scalar or per-channel shift s [1] / [K] (float64 math, float32 result)."""
    w = load_weight(model, site)
    try:
        s = np.asarray(shift, dtype=np.float64).reshape(-1)
        if s.size == 1:
            out = s[0] * w.sum(axis=1, dtype=np.float64)
        else:
            out = w.astype(np.float64) @ s
    finally:
        del w
        release_weight(model, site)
    return out.astype(np.float32)
