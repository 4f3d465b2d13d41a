"""Session factory: op library registration, portable fallback, clear error when the library is missing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from nm_onnx import ops
from nm_onnx.errors import NmOnnxError
from nm_onnx.ops.graphs import op_model
from nm_onnx.runtime import make_session, model_needs_ops

needs_lib = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


def _save(model, path):
    onnx.save(model, str(path))
    return path


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    path = _save(op_model("NMMask", ["X"], ["Y"], n=2, m=4), tmp_path / "mask.onnx")
    monkeypatch.setenv("NM_ONNX_OPS_LIB", str(tmp_path / "no-such-lib.so"))
    assert model_needs_ops(path) == (True, False)
    with pytest.raises(NmOnnxError, match="op library not found.*make ops"):
        make_session(path)
    with pytest.raises(NmOnnxError, match="--portable"):
        make_session(path, use_library=False)


def test_portable_model_runs_without_library(tmp_path, monkeypatch):
    path = _save(op_model("NMMask", ["X"], ["Y"], n=2, m=4, functions=True), tmp_path / "mask.onnx")
    monkeypatch.setenv("NM_ONNX_OPS_LIB", str(tmp_path / "no-such-lib.so"))
    assert model_needs_ops(path) == (True, True)
    sess = make_session(path)
    assert sess.nm_onnx_library is False
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(sess.run(None, {"X": x})[0], ops.nm_mask(x, 2, 4))


@needs_lib
def test_library_registered_and_kernel_matches_reference(tmp_path):
    path = _save(op_model("NMSparseMatMul", ["X", "B"], ["Y"], n=8, m=16, shift="median",
                          variance_correction=1), tmp_path / "mm.onnx")
    sess = make_session(path, threads=1)
    assert sess.nm_onnx_library is True
    assert sess.get_providers()[-1] == "CPUExecutionProvider"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    b = rng.standard_normal((64, 12)).astype(np.float32)
    y = sess.run(None, {"X": x, "B": b})[0]
    np.testing.assert_allclose(y, ops.nm_sparse_matmul(x, b, 8, 16, "median", 1), rtol=1e-5, atol=1e-5)


def test_dense_model_needs_no_library(tmp_path, monkeypatch):
    from models_cache import tiny_export

    monkeypatch.setenv("NM_ONNX_OPS_LIB", str(tmp_path / "no-such-lib.so"))
    sess = make_session(tiny_export("llama"))
    assert sess.nm_onnx_library is False


def test_unloadable_model_is_a_clear_error(tmp_path):
    bad = op_model("NMMask", ["X"], ["Y"], n=2, m=4)
    bad.graph.node[0].op_type = "NoSuchOp"
    bad.graph.node[0].domain = ""
    path = _save(bad, tmp_path / "bad.onnx")
    with pytest.raises(NmOnnxError, match="onnxruntime cannot load"):
        make_session(path)
