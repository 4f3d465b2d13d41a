"""The standard-ONNX function bodies (portable models) against the numpy reference, and the proof that
ORT runs our kernel when the library is registered and the function body when it is not.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from conftest import (
    check_nm_mask,
    check_nm_sparse_matmul,
    check_token_shift,
    function_session,
    needs_library,
    nm_mask_cases,
    sparse_matmul_cases,
    token_shift_cases,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from nm_onnx import ops
from nm_onnx.errors import NmOnnxError
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.testing import assert_same

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=nm_mask_cases(groups=st.integers(0, 3)))
def test_nm_mask_function_matches_reference(case):
    check_nm_mask(function_session, **case)


@SETTINGS
@given(case=token_shift_cases(k=st.integers(0, 9)))
def test_token_shift_function_matches_reference(case):
    check_token_shift(function_session, **case, exact_mean=False)


@SETTINGS
@given(case=sparse_matmul_cases(groups=st.integers(0, 3), o=st.integers(0, 4)))
def test_nm_sparse_matmul_function_matches_reference(case):
    check_nm_sparse_matmul(function_session, **case)


def test_function_needs_opset_18():
    with pytest.raises(NmOnnxError, match="opset >= 18"):
        ops.function_protos(opset=17)


def test_one_function_per_op_in_the_nm_onnx_domain():
    fns = ops.function_protos(opset=18)
    assert sorted(f.name for f in fns) == ["NMMask", "NMSparseMatMul", "TokenShift"]
    assert {f.domain for f in fns} == {ops.DOMAIN}


def test_reference_evaluator_runs_the_ops():
    """REFERENCE_OPS plug the numpy reference into onnx.reference.ReferenceEvaluator (omitted inputs too)."""
    rng = np.random.default_rng(3)
    x, b = rng.standard_normal((2, 3, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    model = op_model("NMSparseMatMul", ["X", "B", "", "sb"], ["Y"], n=2, m=4, shift="median")
    (y,) = ReferenceEvaluator(model, new_ops=ops.REFERENCE_OPS).run(None, {"X": x, "B": b, "sb": b.sum(0)})
    assert_same(y, ops.nm_sparse_matmul(x, b, 2, 4, "median", shift_bias=b.sum(0)))
    model = op_model("TokenShift", ["X"], ["Xc", "eta"])
    xc, eta = ReferenceEvaluator(model, new_ops=ops.REFERENCE_OPS).run(None, {"X": x})
    assert_same(xc, ops.token_shift(x, "median")[0])
    assert_same(eta, ops.token_shift(x, "median")[1])


def executed_op_types(model, with_library: bool, feeds, tmp_path) -> set[str]:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / ("lib" if with_library else "fn"))
    if with_library:
        ops.register_library(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@needs_library
@pytest.mark.parametrize("op", ["NMMask", "TokenShift", "NMSparseMatMul"])
def test_ort_runs_kernel_with_library_and_function_body_without(op, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    feeds = {"X": x}
    if op == "NMSparseMatMul":
        feeds["B"] = rng.standard_normal((16, 3)).astype(np.float32)
        model = op_model(op, ["X", "B"], ["Y"], functions=True, n=2, m=4, shift="median")
    elif op == "NMMask":
        model = op_model(op, ["X"], ["Y"], functions=True, n=2, m=4)
    else:
        model = op_model(op, ["X"], ["Xc", "eta"], functions=True)
    with_lib = executed_op_types(model, True, feeds, tmp_path)
    without = executed_op_types(model, False, feeds, tmp_path)
    assert op in with_lib and "TopK" not in with_lib and "Greater" not in with_lib
    assert op not in without and ("Greater" in without or "TopK" in without)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,o,block,shift,vc,lead", [
    (64, 10, 32, "none", 0, (3,)),
    (96, 7, 16, "median", 1, (2, 3)),  # odd O: a half-filled last byte of each packed row
    (80, 33, 64, "mean", 0, (1, 4)),  # K not a multiple of the block: a partial last block
    (32, 1, 128, "median", 0, (0,)),  # no tokens; one block wider than K
])
def test_nm_sparse_matmul_nbits_function_matches_reference(bits, symmetric, k, o, block, shift, vc, lead):
    """The body (opset 21: unpack by BitShift/BitwiseAnd, zero points through a blocked DequantizeLinear)
    equals the reference on RTN-quantized weights, with and without zero points and optional inputs."""
    from conftest import assert_gemm_close

    from nm_onnx.ops import nbits
    from nm_onnx.ops import reference as ref

    rng = np.random.default_rng(k * o + bits)
    km = nbits.quantize(rng.standard_normal((k, o)).astype(np.float32), bits, block, symmetric).to_kmajor()
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    if x.size:
        x.reshape(-1)[::7] = 0.5  # ties
        x.reshape(-1)[3] = np.nan
    opt = {"channel_scale": rng.random(k).astype(np.float32) + 0.5,
           "shift_bias": rng.standard_normal(o).astype(np.float32), "bias": rng.standard_normal(o).astype(np.float32)}
    for present in (("channel_scale", "shift_bias", "bias"), ()):
        feeds = {"X": x, "B": km.b, "scales": km.scales} | {name: opt[name] for name in present}
        if not symmetric:
            feeds["zero_points"] = km.zero_points
        names = [n if n in feeds else "" for n in
                 ("X", "B", "scales", "zero_points", "channel_scale", "shift_bias", "bias")]
        while not names[-1]:
            names.pop()
        sess = function_session("NMSparseMatMulNBits", names, ["Y"], opset=21, n=8, m=16, bits=bits,
                                block_size=block, shift=shift, variance_correction=vc)
        y = sess.run(None, feeds)[0]
        kw = {name: opt[name] for name in present}
        expected = ref.nm_sparse_matmul_nbits(x, km.b, km.scales, feeds.get("zero_points"), n=8, m=16, bits=bits,
                                              block_size=block, shift=shift, variance_correction=vc, **kw)
        assert_gemm_close(y, expected, x, km.dequantize(), 8, 16, shift, vc, **kw)


def test_nbits_function_needs_opset_21():
    assert "NMSparseMatMulNBits" not in {f.name for f in ops.function_protos(opset=20)}
    assert "NMSparseMatMulNBits" in {f.name for f in ops.function_protos(opset=21)}
