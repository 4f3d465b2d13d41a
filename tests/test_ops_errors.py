"""Every error path of the nm_onnx ops: the message names the op, the input (or attribute) and the fix.

Checked for the C++ kernels through ONNX Runtime, for the numpy reference, and for the static model
check (`nm_onnx.ops.check_model`) that catches bad dtypes before ORT's generic type error.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest

from nm_onnx import ops
from nm_onnx.errors import NmOnnxError
from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import op_model

needs_library = pytest.mark.skipif(not ops.library_available(), reason="op library not built: run `make ops`")
F32 = np.float32


def run_kernel(op, inputs, outputs, feeds, dtype=F32, **attrs):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ops.register_library(so)
    model = op_model(op, inputs, outputs, dtype, **attrs)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def x(*shape):
    return np.ones(shape, F32)


# (case id, op, inputs, feeds, attrs, words the message must contain)
KERNEL_CASES = [
    (
        "k_not_multiple",
        "NMMask",
        ["X"],
        {"X": x(2, 10)},
        {"n": 2, "m": 4},
        ["NMMask", "input X", "K=10", "m=4", "choose an N:M pattern"],
    ),
    (
        "k_not_multiple_smm",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": x(2, 6), "B": x(6, 3)},
        {"n": 2, "m": 4},
        ["NMSparseMatMul", "input X", "K=6", "m=4"],
    ),
    ("n_gt_m", "NMMask", ["X"], {"X": x(2, 8)}, {"n": 5, "m": 4}, ["NMMask", "attribute n=5", "0 <= n <= m"]),
    (
        "n_negative",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": x(2, 8), "B": x(8, 3)},
        {"n": -1, "m": 4},
        ["NMSparseMatMul", "attribute n=-1", "0 <= n <= m"],
    ),
    ("m_zero", "NMMask", ["X"], {"X": x(2, 8)}, {"n": 0, "m": 0}, ["NMMask", "attribute m=0", "m >= 1"]),
    ("missing_n", "NMMask", ["X"], {"X": x(2, 8)}, {"m": 4}, ["NMMask", "attribute n is missing", "set it"]),
    (
        "channel_scale_len",
        "NMMask",
        ["X", "cs"],
        {"X": x(2, 8), "cs": x(4)},
        {"n": 2, "m": 4},
        ["NMMask", "input channel_scale", "[4]", "length 8"],
    ),
    (
        "channel_scale_len_smm",
        "NMSparseMatMul",
        ["X", "B", "cs"],
        {"X": x(2, 8), "B": x(8, 3), "cs": x(7)},
        {"n": 2, "m": 4},
        ["NMSparseMatMul", "input channel_scale", "length 8"],
    ),
    (
        "shift_bias_len",
        "NMSparseMatMul",
        ["X", "B", "", "sb"],
        {"X": x(2, 8), "B": x(8, 3), "sb": x(4)},
        {"n": 2, "m": 4, "shift": "median"},
        ["NMSparseMatMul", "input shift_bias", "length 3", "column sums of B"],
    ),
    (
        "bias_len",
        "NMSparseMatMul",
        ["X", "B", "", "", "bias"],
        {"X": x(2, 8), "B": x(8, 3), "bias": x(2, 3)},
        {"n": 2, "m": 4},
        ["NMSparseMatMul", "input bias", "[2, 3]", "length 3"],
    ),
    (
        "b_shape",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": x(2, 8), "B": x(4, 3)},
        {"n": 2, "m": 4},
        ["NMSparseMatMul", "input B", "[4, 3]", "[K, O]"],
    ),
    (
        "b_rank",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": x(2, 8), "B": x(8)},
        {"n": 2, "m": 4},
        ["NMSparseMatMul", "input B", "[K, O]"],
    ),
    (
        "rank0_mask",
        "NMMask",
        ["X"],
        {"X": np.array(1.0, F32)},
        {"n": 1, "m": 1},
        ["NMMask", "input X", "rank 0", "reshape a scalar to [1]"],
    ),
    (
        "rank0_shift",
        "TokenShift",
        ["X"],
        {"X": np.array(1.0, F32)},
        {},
        ["TokenShift", "input X", "rank 0", "reshape"],
    ),
    (
        "rank0_smm",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": np.array(1.0, F32), "B": x(1, 2)},
        {"n": 1, "m": 1},
        ["NMSparseMatMul", "input X", "rank 0"],
    ),
    (
        "criterion",
        "NMMask",
        ["X"],
        {"X": x(2, 8)},
        {"n": 2, "m": 4, "criterion": "wanda"},
        ["NMMask", "criterion='wanda'", "'magnitude' or 'clact'"],
    ),
    (
        "shift",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": x(2, 8), "B": x(8, 3)},
        {"n": 2, "m": 4, "shift": "static"},
        ["NMSparseMatMul", "shift='static'", "'none', 'median' or 'mean'"],
    ),
    (
        "mode",
        "TokenShift",
        ["X"],
        {"X": x(2, 8)},
        {"mode": "none"},
        ["TokenShift", "mode='none'", "'median' or 'mean'"],
    ),
    (
        "variance_correction",
        "NMSparseMatMul",
        ["X", "B"],
        {"X": x(2, 8), "B": x(8, 3)},
        {"n": 2, "m": 4, "variance_correction": 2},
        ["NMSparseMatMul", "variance_correction=2", "0 or 1"],
    ),
]


@needs_library
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_errors_name_op_input_and_fix(case):
    _, op, inputs, feeds, attrs, words = case
    outputs = ["Xc", "eta"] if op == "TokenShift" else ["Y"]
    with pytest.raises(Exception) as info:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        run_kernel(op, inputs, outputs, feeds, **attrs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert f"(node '{op}_0')" in message


@needs_library
def test_unsupported_dtype_is_rejected_by_ort_and_explained_by_check_model():
    model = op_model("NMMask", ["X"], ["Y"], np.int32, n=2, m=4)
    with pytest.raises(Exception, match=r"tensor\(int32\).*NMMask"):
        so = ort.SessionOptions()
        so.log_severity_level = 4
        ops.register_library(so)
        ort.InferenceSession(model.SerializeToString(), so)
    with pytest.raises(
        NmOnnxError, match=r"NMMask \(node 'NMMask_0'\): input X .* int32; cast it to float32 or float16"
    ):
        ops.check_model(model)


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (op_model("NMSparseMatMul", ["X", "B"], ["Y"], np.float64, n=2, m=4), r"input X .*float64.*cast it"),
        (op_model("TokenShift", ["X"], ["Xc", "eta"], np.int64), r"TokenShift .*input X .*int64"),
        (op_model("NMMask", ["X"], ["Y"], n=9, m=8), r"NMMask .*attribute n=9"),
        (op_model("NMMask", ["X"], ["Y"], m=8), r"NMMask .*attributes n and m are required"),
        (
            op_model("NMSparseMatMul", ["X", "B"], ["Y"], n=1, m=2, shift="static"),
            r"shift='static' is unknown",
        ),
    ],
)
def test_check_model_errors(model, pattern):
    with pytest.raises(NmOnnxError, match=pattern):
        ops.check_model(model)


def test_check_model_accepts_valid_models():
    ops.check_model(
        op_model("NMSparseMatMul", ["X", "B", "", "sb"], ["Y"], np.float16, n=8, m=16, shift="median")
    )
    ops.check_model(op_model("NMMask", ["X"], ["Y"], np.dtype("float32"), n=2, m=4, criterion="clact"))


REFERENCE_CASES = [
    (lambda: ref.nm_mask(x(2, 10), 2, 4), ["NMMask", "input X", "K=10", "m=4"]),
    (lambda: ref.nm_mask(x(2, 8), 5, 4), ["NMMask", "attribute n=5"]),
    (lambda: ref.nm_mask(x(2, 8), -1, 4), ["NMMask", "attribute n=-1"]),
    (lambda: ref.nm_mask(x(2, 8), 2, 4, channel_scale=x(3)), ["NMMask", "input channel_scale", "length 8"]),
    (lambda: ref.nm_mask(np.ones((2, 8), np.int32), 2, 4), ["NMMask", "input X", "int32", "cast it"]),
    (lambda: ref.nm_mask(np.array(1.0, F32), 1, 1), ["NMMask", "input X", "rank 0"]),
    (lambda: ref.token_shift(np.array(1.0, F32)), ["TokenShift", "input X", "rank 0"]),
    (
        lambda: ref.nm_sparse_matmul(x(2, 8), x(8, 3), 2, 4, "median", shift_bias=x(2)),
        ["NMSparseMatMul", "input shift_bias", "length 3"],
    ),
    (
        lambda: ref.nm_sparse_matmul(x(2, 8), x(8, 3), 2, 4, bias=x(4)),
        ["NMSparseMatMul", "input bias", "length 3"],
    ),
    (lambda: ref.nm_sparse_matmul(x(2, 8), x(4, 3), 2, 4), ["NMSparseMatMul", "input B", "[K, O]"]),
    (
        lambda: ref.nm_sparse_matmul(x(2, 8), np.ones((8, 3), np.float16), 2, 4),
        ["NMSparseMatMul", "input B", "cast B"],
    ),
    (lambda: ref.nm_sparse_matmul(x(2, 8), x(8, 3), 2, 4, "static"), ["NMSparseMatMul", "shift='static'"]),
]


@pytest.mark.parametrize("case", range(len(REFERENCE_CASES)))
def test_reference_errors_name_op_input_and_fix(case):
    call, words = REFERENCE_CASES[case]
    with pytest.raises(NmOnnxError) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_missing_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv("NM_ONNX_OPS_LIB", str(tmp_path / "nope.so"))
    assert not ops.library_available()
    with pytest.raises(NmOnnxError, match=re.escape("make ops")):
        ops.library_path()
    with pytest.raises(NmOnnxError, match="NM_ONNX_OPS_LIB"):
        ops.register_library(ort.SessionOptions())
