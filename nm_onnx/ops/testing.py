"""Test helpers for the nm_onnx ops: random data with ties and special values, bitwise comparison.

Shared by the op tests, the pass tests and the benchmarks so that "equal" means the same everywhere:
bit-for-bit, except that any NaN equals any NaN.
"""

from __future__ import annotations

import numpy as np

SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0])
TIES = np.array([0.0, -0.0, 1.0, -1.0, 2.0, 0.5])


def random_values(rng: np.random.Generator, shape, kind: str = "normal", dtype=np.float32) -> np.ndarray:
    """'normal' N(0, 1); 'ties' a few repeated values (with +-0); 'special' normal mixed with +-0, +-inf, NaN."""
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "ties":
        x = rng.choice(TIES, size=shape)
    elif kind == "special":
        x = rng.standard_normal(shape)
        x = np.where(rng.random(shape) < 0.3, rng.choice(SPECIALS, size=shape), x)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return np.asarray(x).astype(dtype)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same shape, dtype and bits (any NaN equals any NaN; -0 differs from +0)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    an, en = np.isnan(actual), np.isnan(expected)
    np.testing.assert_array_equal(an, en)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    np.testing.assert_array_equal(actual[~an].view(bits), expected[~en].view(bits))
