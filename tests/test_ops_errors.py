"""Every error path of the nm_onnx ops: the message names the op, the input (or attribute) and the fix.

Each case runs through the C++ kernels (ONNX Runtime), the numpy reference (onnx's ReferenceEvaluator
with REFERENCE_OPS) and, for attribute errors, the static model check (`nm_onnx.ops.check_model`,
which also catches bad dtypes and inputs before ORT's generic errors): one wording everywhere.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from conftest import kernel_session, needs_library, node_inputs
from onnx.reference import ReferenceEvaluator

from nm_onnx import ops
from nm_onnx.errors import NmOnnxError
from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.schemas import SCHEMAS

F32 = np.float32
MASK, SHIFT, SMM, NB = "NMMask", "TokenShift", "NMSparseMatMul", "NMSparseMatMulNBits"


def x(*shape):
    return np.ones(shape, F32)


XB = {"X": x(2, 8), "B": x(8, 3)}
# NMSparseMatMulNBits: K=32, O=3, int4 (2 bytes per packed row), block 16 (2 scale rows)
NBQ = {"X": x(2, 32), "B": np.zeros((32, 2), np.uint8), "scales": np.ones((2, 3), F32)}
NBA = {"n": 2, "m": 4, "block_size": 16}

# id: (op, feeds by input name, attributes, words the message must contain besides the op's name)
SHAPE_CASES = {
    "k_not_multiple": (
        MASK,
        {"X": x(2, 10)},
        {"n": 2, "m": 4},
        ["input X", "K=10", "m=4", "choose an N:M pattern"],
    ),
    "k_not_multiple_smm": (SMM, {"X": x(2, 6), "B": x(6, 3)}, {"n": 2, "m": 4}, ["input X", "K=6", "m=4"]),
    "channel_scale_len": (
        MASK,
        {"X": x(2, 8), "channel_scale": x(4)},
        {"n": 2, "m": 4},
        ["input channel_scale", "[4]", "length 8"],
    ),
    "channel_scale_len_smm": (
        SMM,
        {**XB, "channel_scale": x(7)},
        {"n": 2, "m": 4},
        ["input channel_scale", "length 8"],
    ),
    "shift_bias_len": (
        SMM,
        {**XB, "shift_bias": x(4)},
        {"n": 2, "m": 4, "shift": "median"},
        ["input shift_bias", "length 3", "column sums of B"],
    ),
    "bias_len": (SMM, {**XB, "bias": x(2, 3)}, {"n": 2, "m": 4}, ["input bias", "[2, 3]", "length 3"]),
    "b_shape": (SMM, {"X": x(2, 8), "B": x(4, 3)}, {"n": 2, "m": 4}, ["input B", "[4, 3]", "[K, O]"]),
    "b_rank": (SMM, {"X": x(2, 8), "B": x(8)}, {"n": 2, "m": 4}, ["input B", "[K, O]"]),
    "rank0_mask": (
        MASK,
        {"X": np.array(1.0, F32)},
        {"n": 1, "m": 1},
        ["input X", "rank 0", "reshape a scalar to [1]"],
    ),
    "rank0_shift": (SHIFT, {"X": np.array(1.0, F32)}, {}, ["input X", "rank 0", "reshape"]),
    "rank0_smm": (SMM, {"X": np.array(1.0, F32), "B": x(1, 2)}, {"n": 1, "m": 1}, ["input X", "rank 0"]),
    "k_not_multiple_nbits": (NB, {**NBQ, "X": x(2, 30), "B": np.zeros((30, 2), np.uint8)}, NBA,
                             ["input X", "K=30", "m=4"]),
    "nbits_scales_shape": (NB, {**NBQ, "scales": np.ones((3, 3), F32)}, NBA,
                           ["input scales", "[3, 3]", "float32 [ceil(K/block_size), O] = [2, O]", "K=32",
                            "block_size=16"]),
    "nbits_b_shape": (NB, {**NBQ, "B": np.zeros((32, 3), np.uint8)}, NBA,
                      ["input B", "[32, 3]", "uint8 [K, ceil(O*bits/8)] = [32, 2]", "K-major"]),
    "nbits_b_shape_int8": (NB, NBQ, {**NBA, "bits": 8}, ["input B", "[32, 2]", "= [32, 3]"]),
    "nbits_zero_points_shape": (NB, {**NBQ, "zero_points": np.zeros((2, 3), np.uint8)}, NBA,
                                ["input zero_points", "[2, 3]", "= [2, 2]"]),
    "nbits_shift_bias_len": (NB, {**NBQ, "shift_bias": x(4)}, NBA,
                             ["input shift_bias", "length 3", "column sums of the dequantized weight"]),
    "nbits_channel_scale_len": (NB, {**NBQ, "channel_scale": x(8)}, NBA, ["input channel_scale", "length 32"]),
    "nbits_bias_len": (NB, {**NBQ, "bias": x(2)}, NBA, ["input bias", "[2]", "length 3"]),
    "nbits_block_size_odd": (NB, NBQ, {**NBA, "block_size": 24}, ["attribute block_size=24", "power of two >= 16"]),
    "nbits_block_size_small": (NB, NBQ, {**NBA, "block_size": 8}, ["attribute block_size=8", "e.g. 32"]),
}
ATTRIBUTE_CASES = {
    "n_gt_m": (MASK, {"X": x(2, 8)}, {"n": 5, "m": 4}, ["attribute n=5", "0 <= n <= m"]),
    "n_negative": (SMM, XB, {"n": -1, "m": 4}, ["attribute n=-1", "0 <= n <= m"]),
    "m_zero": (MASK, {"X": x(2, 8)}, {"n": 0, "m": 0}, ["attribute m=0", "m >= 1"]),
    "missing_n": (MASK, {"X": x(2, 8)}, {"m": 4}, ["attribute n is missing", "set it"]),
    "criterion": (
        MASK,
        {"X": x(2, 8)},
        {"n": 2, "m": 4, "criterion": "wanda"},
        ["criterion='wanda'", "'magnitude' or 'clact'"],
    ),
    "shift": (SMM, XB, {"n": 2, "m": 4, "shift": "static"}, ["shift='static'", "'none', 'median' or 'mean'"]),
    "mode": (SHIFT, {"X": x(2, 8)}, {"mode": "none"}, ["attribute mode='none'", "'median' or 'mean'"]),
    "variance_correction": (
        SMM,
        XB,
        {"n": 2, "m": 4, "variance_correction": 2},
        ["variance_correction=2", "0 or 1"],
    ),
    # NMSparseMatMulNBits
    "nbits_bits": (NB, NBQ, {**NBA, "bits": 3}, ["attribute bits=3", "must be 4 or 8"]),
    "nbits_missing_block_size": (NB, NBQ, {"n": 2, "m": 4}, ["attribute block_size is missing", "block_size=32"]),
    "nbits_shift": (NB, NBQ, {**NBA, "shift": "static"}, ["shift='static'", "'none', 'median' or 'mean'"]),
    "nbits_n_gt_m": (NB, NBQ, {**NBA, "n": 5}, ["attribute n=5", "0 <= n <= m"]),
    "nbits_variance_correction": (NB, NBQ, {**NBA, "variance_correction": 2}, ["variance_correction=2", "0 or 1"]),
}
CASES = {**SHAPE_CASES, **ATTRIBUTE_CASES}


def case_model(op, feeds, attrs):
    return op_model(op, node_inputs(op, feeds), list(SCHEMAS[op].outputs), **attrs)


def assert_words(message, op, words):
    for word in [op, *words]:
        assert word in message, f"{word!r} not in {message!r}"


@needs_library
@pytest.mark.parametrize("case", CASES)
def test_kernel_errors_name_op_input_and_fix(case):
    op, feeds, attrs, words = CASES[case]
    with pytest.raises(Exception) as info:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        kernel_session(op, node_inputs(op, feeds), list(SCHEMAS[op].outputs), **attrs).run(None, feeds)
    assert_words(str(info.value), op, words)
    assert f"(node '{op}_0')" in str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_reference_errors_say_the_same(case):
    op, feeds, attrs, words = CASES[case]
    with pytest.raises(NmOnnxError) as info:
        ReferenceEvaluator(case_model(op, feeds, attrs), new_ops=ops.REFERENCE_OPS).run(None, feeds)
    assert_words(str(info.value), op, words)


@pytest.mark.parametrize("case", ATTRIBUTE_CASES)
def test_check_model_finds_attribute_errors_first(case):
    op, feeds, attrs, words = ATTRIBUTE_CASES[case]
    with pytest.raises(NmOnnxError) as info:
        ops.check_model(case_model(op, feeds, attrs))
    assert_words(str(info.value), op, [f"(node '{op}_0')", *words])


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
        (op_model("NMMask", ["X"], ["Y"], np.dtype("bfloat16"), n=2, m=4), r"bfloat16 runs on CUDA only"),
        (op_model("NMMask", ["X", "cs", "extra"], ["Y"], n=2, m=4), r"3 inputs; NMMask takes at most 2"),
        (op_model("NMSparseMatMul", ["X", "", "cs"], ["Y"], n=2, m=4), r"input B is missing; it is required"),
        (op_model("NMMask", ["X"], ["Y"], n=2.0, m=4), r"attribute n has type float; set it as type int"),
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
    ops.check_model(op_model("NMMask", ["X"], ["Y"], np.dtype("bfloat16"), n=2, m=4), cuda=True)


REFERENCE_ONLY_CASES = [
    (lambda: ref.nm_mask(np.ones((2, 8), np.int32), 2, 4), ["NMMask", "input X", "int32", "cast it"]),
    (lambda: ref.nm_mask(x(2, 8), -1, 4), ["NMMask", "attribute n=-1"]),
    (
        lambda: ref.nm_sparse_matmul(x(2, 8), np.ones((8, 3), np.float16), 2, 4),
        ["NMSparseMatMul", "input B", "cast B"],
    ),
]


@pytest.mark.parametrize("case", range(len(REFERENCE_ONLY_CASES)))
def test_reference_function_errors(case):
    call, words = REFERENCE_ONLY_CASES[case]
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
