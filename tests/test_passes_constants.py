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


@pytest.mark.parametrize("transposed", [False, True])
def test_external_data_one_read_matches_reference(transposed, tmp_path, monkeypatch):
    """Weights in an external data file are read in chunks with file reads (no mmap): same constants."""
    monkeypatch.setattr(constants, "CHUNK_ELEMENTS", 700)
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 80)) * 0.03 - 0.02).astype(np.float16)  # W [O, K], mean far from 0
    w[0, 0] = 2.0
    stored = w if transposed else np.ascontiguousarray(w.T)
    pad = np.ones(37, np.float16)  # the weight sits at a non-zero offset of the data file
    ir.save(_model_with_two(pad, stored), tmp_path / "m.onnx", external_data="m.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    site = _site(stored, transposed)
    for criterion in ("amber", "wanda"):
        f, r = constants.weight_constants(model, site, criterion, need_r=True)
        np.testing.assert_allclose(f, channel_factors(w, criterion), rtol=2e-6)
        np.testing.assert_allclose(r, w.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-6)
    f, r = constants.weight_constants(model, site, None, need_r=False)
    assert f is None and r is None


def _model_with_two(pad, stored):
    values = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in (("pad", pad), ("w", stored))]
    return ir.Model(ir.Graph([], [], nodes=[], initializers=values), ir_version=10)


def test_thread_pool_gives_the_serial_results_in_order():
    rng = np.random.default_rng(7)
    arrays = [(rng.standard_normal((16 * (i + 1), 32)) * 0.1).astype(np.float16) for i in range(5)]
    values = [ir.Value(name=f"w{i}", const_value=ir.tensor(a, name=f"w{i}")) for i, a in enumerate(arrays)]
    model = ir.Model(ir.Graph([], [], nodes=[], initializers=values), ir_version=10)
    sites = [LinearSite(module=f"m{i}", kind="other", k=a.shape[0], o=a.shape[1], matmul="mm", input="x",
                        output="y", weight=f"w{i}", transposed=False, dtype="FLOAT16") for i, a in enumerate(arrays)]
    jobs = [(s, c, nr) for s, c, nr in zip(sites, ["amber", "wanda", None, "amber", None], [True, False, True, True, False])]
    serial = list(constants.site_constants_parallel(model, jobs, workers=1))
    pooled = list(constants.site_constants_parallel(model, jobs, workers=2))
    assert len(pooled) == len(jobs) and pooled[4] == (None, None)
    for (fs, rs), (fp, rp), (s, c, nr) in zip(serial, pooled, jobs):
        assert (fs is None) == (c is None) and (rs is None) == (not nr)
        for a, b in ((fs, fp), (rs, rp)):
            assert (a is None and b is None) or np.array_equal(a, b)
    np.testing.assert_allclose(pooled[3][0], channel_factors(arrays[3].T, "amber"), rtol=2e-6)
