"""Weight access for the passes: one weight at a time, straight from (external) data.

The passes need two constants per site that depend on the weight: the shift bias r = W·1 (column
sums of B = W^T) and the Amber / Wanda channel factors (`nm_onnx.reference.channel_factors`). They
are computed here weight by weight, and the tensor's memory (mmap or loaded bytes) is released right
after, so transforming a 13 GB model holds a single weight in memory.
"""

from __future__ import annotations

import numpy as np


def _initializer(model, name: str):
    value = model.graph.initializers.get(name)
    if value is None or value.const_value is None:
        from nm_onnx.errors import NmOnnxError

        raise NmOnnxError(f"weight initializer '{name}' has no data in the model")
    return value.const_value


def load_weight(model, site) -> np.ndarray:
    """The site's weight W [O, K] as stored dtype (a view onto the data when possible)."""
    tensor = _initializer(model, site.weight)
    array = tensor.numpy()
    return array if site.transposed else array.T


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


CHUNK_ELEMENTS = 4 * 1024 * 1024  # float64 working set of the streaming passes: 32 MiB


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


def _amber_mu_sigma_fp16(stored: np.ndarray) -> tuple[float, float]:
    """Amber's trimmed mean/std of a float16 weight, exactly, from a 65536-bin histogram (one pass)."""
    from nm_onnx.reference.functional import AMBER_QUANTILES

    bits = np.ascontiguousarray(stored).view(np.uint16).reshape(-1)
    counts = np.zeros(65536, dtype=np.int64)
    for start in range(0, bits.size, CHUNK_ELEMENTS):  # bincount casts to int64: keep that bounded
        counts += np.bincount(bits[start:start + CHUNK_ELEMENTS], minlength=65536)
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


def _streaming_pass(stored: np.ndarray, transposed: bool, mu: float | None, need_r: bool):
    """One chunked float64 pass: (sum_o (W[o, j] - mu)^2 per input channel j or None, r = W·1 or None)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, stored.shape[1]))
    ss = np.zeros(stored.shape[0] if not transposed else stored.shape[1]) if mu is not None else None
    r = np.zeros(stored.shape[1] if not transposed else stored.shape[0]) if need_r else None
    for start in range(0, stored.shape[0], rows):
        chunk = stored[start:start + rows].astype(np.float64)
        if transposed:  # stored W [O, K]: chunk = some output rows
            if r is not None:
                r[start:start + rows] = chunk.sum(axis=1)
            if ss is not None:
                d = chunk - mu
                ss += (d * d).sum(axis=0)
        else:  # stored B [K, O]: chunk = some input channels
            if r is not None:
                r += chunk.sum(axis=0)
            if ss is not None:
                d = chunk - mu
                ss[start:start + rows] = (d * d).sum(axis=1)
    return ss, r


def weight_constants(model, site, criterion: str | None, need_r: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(channel factors f [K] or None, r = W·1 [O] or None) of one site, float32, one weight in memory.

    Amber on float16 weights and Wanda take a streaming path (exact histogram quantiles for float16,
    chunked float64 sums: a few passes, 32 MiB of work memory, fast on 7B models); Amber on other
    dtypes calls `nm_onnx.reference.channel_factors` itself. Both agree with the reference to float
    rounding (tests/test_passes_constants.py).
    """
    if criterion not in ("amber", "wanda") and not need_r:
        return None, None
    tensor = _initializer(model, site.weight)
    stored = tensor.numpy()
    try:
        factors = None
        mu = sigma = None
        if criterion == "amber" and stored.dtype == np.float16:
            mu, sigma = _amber_mu_sigma_fp16(stored)
        elif criterion == "wanda":
            mu = 0.0
        elif criterion == "amber":
            from nm_onnx.reference import channel_factors

            factors = channel_factors(stored if site.transposed else stored.T, criterion)
        ss, r = _streaming_pass(stored, site.transposed, mu, need_r)
        if ss is not None:
            if criterion == "wanda":
                factors = np.sqrt(ss).astype(np.float32)
            else:
                c = np.sqrt(ss) / sigma
                cmin = c.min()
                if not cmin > 0:
                    cmin = np.finfo(np.float64).tiny
                factors = (c / cmin).astype(np.float32)
        r = r.astype(np.float32) if r is not None else None
    finally:
        del stored
        _release(tensor)
    return factors, r


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
