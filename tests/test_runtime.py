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


@pytest.mark.parametrize(
    "model, needle",
    [
        (lambda: op_model("NMMask", ["X"], ["Y"], dtype=np.float64, n=2, m=4), "input X ('X') has dtype float64"),
        (lambda: op_model("NMSparseMatMul", ["X", "B"], ["Y"], n=20, m=16), "attribute n=20 must satisfy"),
        (lambda: op_model("NMMask", ["X"], ["Y"], n=2, m=4, criterion="bogus"), "criterion='bogus' is unknown"),
        (lambda: op_model("TokenShift", ["X"], ["Xc", "eta"], mode="mode"), "mode='mode' is unknown"),
    ],
)
def test_bad_node_is_our_error_not_ort(tmp_path, model, needle):
    """make_session runs nm_onnx.ops.validate first: our message naming the node, not ORT's."""
    path = _save(model(), tmp_path / "bad.onnx")
    with pytest.raises(NmOnnxError, match="node '") as e:
        make_session(path)
    assert needle in str(e.value) and "onnxruntime" not in str(e.value)


def test_bad_constant_dtype_in_a_big_graph_is_found(tmp_path):
    """The weightless skeleton still sees an initializer's dtype (B stored as float64)."""
    from onnx import helper, numpy_helper

    m = op_model("NMSparseMatMul", ["X", "B"], ["Y"], n=2, m=4)
    m.graph.input.pop()  # B becomes a constant
    m.graph.initializer.append(numpy_helper.from_array(np.ones((8, 3), np.float64), "B"))
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 8]))
    with pytest.raises(NmOnnxError, match=r"input B \('B'\) has dtype float64"):
        make_session(_save(m, tmp_path / "bad.onnx"))


def test_missing_library_cli_one_line_exit_2(tmp_path):
    """The CLI on a model that needs the library, with the library absent: one line, exit 2."""
    import os
    import subprocess
    import sys

    path = _save(op_model("NMMask", ["X"], ["Y"], n=2, m=4), tmp_path / "mask.onnx")
    env = {**os.environ, "NM_ONNX_OPS_LIB": str(tmp_path / "no-such-lib.so")}
    r = subprocess.run([sys.executable, "-m", "nm_onnx", "bench", str(path), "--decode", "0"], env=env,
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "op library not found" in lines[0] and "make ops" in lines[0], r.stderr
