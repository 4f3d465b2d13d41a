"""graph/constants.py: the streaming weight constants equal the reference (channel_factors, W·1)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from nm_onnx.graph import constants
from nm_onnx.graph.sites import LinearSite
from nm_onnx.reference import channel_factors


def _model_with(stored: np.ndarray):
    value = ir.Value(name="w", const_value=ir.tensor(stored, name="w"))
    graph = ir.Graph([], [], nodes=[], initializers=[value])
    return ir.Model(graph, ir_version=10)


def _site(stored, transposed):
    o, k = stored.shape if transposed else stored.shape[::-1]
    return LinearSite(module="m", kind="other", k=k, o=o, matmul="mm", input="x", output="y", weight="w",
                      transposed=transposed, dtype="FLOAT16")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("criterion", ["amber", "wanda"])
def test_streaming_constants_match_reference(dtype, transposed, criterion, monkeypatch):
    monkeypatch.setattr(constants, "CHUNK_ELEMENTS", 1000)  # several chunks
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 64)) * 0.05 + 0.01).astype(dtype)  # W [O, K]
    w[3, 5] = 0.9  # outliers the trimming must drop
    w[7, 1] = -0.8
    stored = w if transposed else np.ascontiguousarray(w.T)
    f, r = constants.weight_constants(_model_with(stored), _site(stored, transposed), criterion, need_r=True)
    np.testing.assert_allclose(f, channel_factors(w, criterion), rtol=2e-6)
    np.testing.assert_allclose(r, w.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-6)


def test_histogram_quantile_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10001).astype(np.float16)
    values, counts = np.unique(x.astype(np.float64), return_counts=True)
    for q in (0.0, 0.005, 0.3, 0.5, 0.995, 1.0):
        assert constants._quantile_from_histogram(values, counts, q) == np.quantile(x.astype(np.float64), q)
