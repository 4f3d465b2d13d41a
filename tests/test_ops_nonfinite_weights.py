"""One semantics for non-finite weights: NMSparseMatMul sums x_tk * B[k, :] over the KEPT k only.

The C++ kernel never reads a pruned row of B, so an inf or NaN there cannot reach the output; the
numpy reference and the function body (a portable model without the op library) must agree with it,
and IEEE arithmetic still applies to the kept terms (a kept 0 times inf is NaN). The unfused form
NMMask -> standard MatMul multiplies every row and cannot agree (0 * inf = NaN): that is why transform
refuses weights with non-finite values (docs/ops.md).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import (
    assert_gemm_close,
    dtypes,
    function_session,
    kernel_session,
    kinds,
    leading,
    needs_library,
    sparse_matmul_inputs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.testing import SPECIALS, assert_same, random_values

INF, NAN = np.inf, np.nan
# 2:4 keeps entries 0 and 2 of the first group and 3 and 0 (a kept zero: the tie rule) of the second.
X = np.array([[3.0, 0.1, -2.0, 0.2, 0.0, 0.0, 0.0, 5.0]], np.float32)
B = np.ones((8, 4), np.float32)
B[1, 0] = INF  # pruned row
B[3, 1] = NAN  # pruned row
B[2, 2] = INF  # kept row, x = -2: -inf
B[4, 3] = INF  # kept row, x = 0: 0 * inf = NaN
# Kept terms: 3 * B[0] - 2 * B[2] + 0 * B[4] + 5 * B[7].
EXPECTED = np.array([[6.0, 6.0, -INF, NAN]], np.float32)


IMPLEMENTATIONS = ["function", pytest.param("kernel", marks=needs_library)]


def run(impl, inputs, feeds, dtype=np.float32, opset=18, **attrs):
    """y of the function body (portable model, no op library) or of the C++ kernel."""
    if impl == "kernel":
        return kernel_session("NMSparseMatMul", inputs, ["Y"], dtype, **attrs).run(None, feeds)[0]
    return function_session("NMSparseMatMul", inputs, ["Y"], dtype, opset=opset, **attrs).run(None, feeds)[0]


def test_reference_reads_only_the_kept_rows_of_b():
    assert_same(ref.nm_sparse_matmul(X, B, 2, 4), EXPECTED)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_pruned_rows_of_b_are_never_read_and_kept_rows_follow_ieee(impl):
    assert_same(run(impl, ["X", "B"], {"X": X, "B": B}, n=2, m=4), EXPECTED)


def test_unfused_mask_then_matmul_differs_on_a_pruned_inf():
    """What transform's refusal of non-finite weights guards against: NMMask -> MatMul reads every row."""
    mask = op_model("NMMask", ["X"], ["Xh"], functions=True, n=2, m=4)
    mask.graph.node.append(helper.make_node("MatMul", ["Xh", "B"], ["Y"]))
    mask.graph.input.append(helper.make_tensor_value_info("B", TensorProto.FLOAT, None))
    mask.graph.output[0].name = "Y"
    sess = ort.InferenceSession(mask.SerializeToString(), providers=["CPUExecutionProvider"])
    unfused = sess.run(None, {"X": X, "B": B})[0]
    assert np.isnan(unfused[0, :2]).all()  # the pruned 0.1 and 0.2 meet inf and NaN: 0 * inf, 0 * NaN
    assert_same(unfused[:, 2:], EXPECTED[:, 2:])
    assert_same(ref.nm_sparse_matmul(X, B, 2, 4)[:, :2], EXPECTED[:, :2])  # the fused op: finite


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.sampled_from([1, 2, 4, 8, 16]),
    n_frac=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    lead=leading,
    groups=st.integers(0, 3),
    o=st.integers(1, 4),
    kind=kinds,
    dtype=dtypes,
    shift=st.sampled_from(["none", "median", "mean"]),
    vc=st.sampled_from([0, 1]),
    optional=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    opset=st.sampled_from([18, 21]),
    seed=st.integers(0, 2**31),
)
def test_implementations_agree_on_non_finite_weights(
    impl, m, n_frac, lead, groups, o, kind, dtype, shift, vc, optional, opset, seed
):
    """inf and NaN in random entries of B (pruned and kept rows): function body and kernel = reference."""
    n = int(m * n_frac)
    rng = np.random.default_rng(seed)
    k = m * groups
    x = random_values(rng, (*lead, k), kind, dtype)
    b = rng.standard_normal((k, o))
    b = np.where(rng.random((k, o)) < 0.2, rng.choice(SPECIALS[2:5], size=(k, o)), b).astype(dtype)
    names, feeds, keywords = sparse_matmul_inputs(rng, x, b, optional)
    attrs = {"n": n, "m": m, "shift": shift, "variance_correction": vc}
    expected = ref.nm_sparse_matmul(x, b, n, m, shift, vc, **keywords)
    y = run(impl, names, feeds, dtype, opset, **attrs)
    assert_gemm_close(y, expected, x, b, n, m, shift, vc, **keywords)
