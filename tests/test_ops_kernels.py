"""The C++ CPU kernels of libnm_onnx_ops against the numpy reference (nm_onnx.ops.reference).

Randomised with hypothesis: ranks 1-4, every M in {1, 2, 4, 8, 16, 32, 64} (and a large M for the
unstructured top-n path), all N, ties, +-0, +-inf, NaN, empty tensors, float32 and float16. Masks and
shifts must match bit for bit; the GEMM to float tolerance. One and two intra-op threads must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    check_nm_mask,
    check_nm_sparse_matmul,
    check_token_shift,
    needs_library,
    nm_mask_cases,
    sparse_matmul_cases,
    token_shift_cases,
)
from conftest import kernel_session as session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nm_onnx.ops import reference as ref
from nm_onnx.ops.testing import assert_same, random_values

pytestmark = needs_library

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=nm_mask_cases(groups=st.integers(0, 3) | st.sampled_from([4, 8, 16])))
def test_nm_mask_matches_reference(case):
    check_nm_mask(session, **case)


@SETTINGS
@given(case=token_shift_cases(k=st.integers(0, 9) | st.integers(10, 700)))  # wide rows: the median's passes
def test_token_shift_matches_reference(case):
    check_token_shift(session, **case)


@SETTINGS
@given(case=sparse_matmul_cases(groups=st.integers(0, 3) | st.sampled_from([4, 8, 16]), o=st.integers(0, 5)))
def test_nm_sparse_matmul_matches_reference(case):
    check_nm_sparse_matmul(session, **case)


@pytest.mark.parametrize("m", [128, 576])
def test_large_groups_unstructured_top_n(m):
    """m = K is per-token unstructured top-n (the 50%/70% baselines): selection path for m > 64."""
    rng = np.random.default_rng(m)
    x = random_values(rng, (5, m * 2), "ties")
    x[0, :m] = random_values(rng, (m,), "special")
    for n in (0, 1, m * 3 // 10, m // 2, m):
        y = session("NMMask", ["X"], ["Y"], n=n, m=m).run(None, {"X": x})[0]
        assert_same(y, ref.nm_mask(x, n, m))
        b = rng.standard_normal((m * 2, 3)).astype(np.float32)
        ys = session("NMSparseMatMul", ["X", "B"], ["Y"], n=n, m=m, shift="median").run(
            None, {"X": x, "B": b}
        )[0]
        np.testing.assert_allclose(ys, ref.nm_sparse_matmul(x, b, n, m, "median"), rtol=1e-4, atol=1e-4)


def test_tie_nan_and_signed_zero_rules():
    """The contract on a hand-written row: lower index wins ties, NaN beats +inf, -0 == +0."""
    x = np.array([[1.0, -1.0, 1.0, 0.5, np.inf, np.nan, -np.inf, 3.0, -0.0, 0.0, 0.0, -0.0]], np.float32)
    y = session("NMMask", ["X"], ["Y"], n=2, m=4).run(None, {"X": x})[0]
    expected = np.array([[1.0, -1.0, 0.0, 0.0, np.inf, np.nan, 0, 0, -0.0, 0.0, 0, 0]], np.float32)
    assert_same(y, expected)
    y = session("NMMask", ["X"], ["Y"], n=1, m=4).run(None, {"X": x})[0]
    expected = np.array([[1.0, 0, 0, 0, 0, np.nan, 0, 0, -0.0, 0, 0, 0]], np.float32)
    assert_same(y, expected)


def test_median_is_lower_median_and_nan_propagates():
    x = np.array([[4.0, 1.0, 3.0, 2.0], [1.0, np.nan, 2.0, 3.0], [-0.0, 0.0, 5.0, -5.0]], np.float32)
    xc, eta = session("TokenShift", ["X"], ["Xc", "eta"], mode="median").run(None, {"X": x})
    assert eta[0, 0] == 2.0 and np.isnan(eta[1, 0]) and eta[2, 0] == 0.0 and not np.signbit(eta[2, 0])
    assert np.isnan(xc[1]).all()


@pytest.mark.parametrize("op", ["NMMask", "TokenShift", "NMSparseMatMul"])
def test_one_and_two_threads_identical(op):
    rng = np.random.default_rng(7)
    x = random_values(rng, (4, 33, 64), "special")
    x[1] = random_values(rng, (33, 64), "ties")
    if op == "NMMask":
        args = (["X"], ["Y"]), {"n": 8, "m": 16, "criterion": "clact"}
        feeds = {"X": x}
    elif op == "TokenShift":
        args = (["X"], ["Xc", "eta"]), {"mode": "median"}
        feeds = {"X": x}
    else:
        b = rng.standard_normal((64, 48)).astype(np.float32)
        args = (["X", "B", "", "sb"], ["Y"]), {"n": 2, "m": 4, "shift": "median", "variance_correction": 1}
        feeds = {"X": x, "B": b, "sb": b.sum(0)}
    one = session(op, *args[0], threads=1, **args[1]).run(None, feeds)
    two = session(op, *args[0], threads=2, **args[1]).run(None, feeds)
    for a, b_ in zip(one, two):
        assert_same(a, b_)


ISA_SCRIPT = """
import numpy as np, onnxruntime as ort
from nm_onnx import ops
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.testing import assert_same, random_values
rng = np.random.default_rng(11)
for m in (1, 2, 4, 8, 16, 32, 64):
    for kind in ("normal", "ties", "special"):
        x = random_values(rng, (3, 7, 16 * m + 2 * max(m, 16)), kind)
        for n in sorted({0, 1, m // 2, m - 1, m}):
            for crit in ("magnitude", "clact"):
                so = ort.SessionOptions()
                ops.register_library(so)
                sess = ort.InferenceSession(op_model("NMMask", ["X"], ["Y"], n=n, m=m, criterion=crit)
                                            .SerializeToString(), so, providers=["CPUExecutionProvider"])
                assert_same(sess.run(None, {"X": x})[0], ops.nm_mask(x, n, m, crit))
# Scaled keys (channel_scale) through the threshold blocks and their tail groups.
for m in (8, 16, 32):
    x = random_values(rng, (5, 16 * m + 2 * max(m, 16)), "ties")
    cs = rng.choice(np.array([0.5, 1.0, 2.0, 3.0], np.float32), size=x.shape[-1])
    for n in (1, m // 2, m - 1):
        so = ort.SessionOptions()
        ops.register_library(so)
        sess = ort.InferenceSession(op_model("NMMask", ["X", "channel_scale"], ["Y"], n=n, m=m)
                                    .SerializeToString(), so, providers=["CPUExecutionProvider"])
        assert_same(sess.run(None, {"X": x, "channel_scale": cs})[0], ops.nm_mask(x, n, m, "magnitude", cs))
# Row statistics (median, mean, variance factor, kept indices) on wide rows of every kind.
for k in (1, 2, 15, 16, 17, 576, 1000):
    for kind in ("normal", "ties", "special"):
        x = random_values(rng, (9, k), kind)
        x[0] = 0.0
        x[1, : k // 2] = -0.0
        for mode in ("median", "mean"):
            so = ort.SessionOptions()
            ops.register_library(so)
            sess = ort.InferenceSession(op_model("TokenShift", ["X"], ["Xc", "eta"], mode=mode)
                                        .SerializeToString(), so, providers=["CPUExecutionProvider"])
            for got, want in zip(sess.run(None, {"X": x}), ops.token_shift(x, mode)):
                assert_same(got, want)
    if k % 4 == 0:
        x = random_values(rng, (9, k), "normal")
        b = rng.standard_normal((k, 5)).astype(np.float32)
        so = ort.SessionOptions()
        ops.register_library(so)
        sess = ort.InferenceSession(op_model("NMSparseMatMul", ["X", "B", "", "sb"], ["Y"], n=2, m=4,
                                             shift="median", variance_correction=1)
                                    .SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"X": x, "B": b, "sb": b.sum(0)})[0]
        np.testing.assert_allclose(y, ops.nm_sparse_matmul(x, b, 2, 4, "median", 1, None, b.sum(0)),
                                   rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_every_instruction_set_variant_matches_reference(isa):
    """The float32 NMMask paths chosen at run time (AVX-512 lane permutes, AVX2 / baseline transposed
    ranking) and the row statistics (median bisection, variances, kept indices) all equal the reference;
    NM_ONNX_ISA caps the variant (avx512 = the machine's best)."""
    import os
    import subprocess
    import sys

    from test_sparse_matmul_perf_path import _cpu_has

    # The library falls back to the best variant the CPU has: skip rather than test another variant twice.
    needs = {"avx512": ["avx512f", "avx512bw", "avx512vl"], "avx2": ["avx2"], "base": []}[isa]
    missing = [flag for flag in needs if not _cpu_has(flag)]
    if missing:
        pytest.skip(f"CPU has no {', '.join(missing)}: the {isa} variant cannot run here")
    env = dict(os.environ, NM_ONNX_ISA="" if isa == "avx512" else isa)
    out = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
