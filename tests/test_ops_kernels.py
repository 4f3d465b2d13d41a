"""The C++ CPU kernels of libnm_onnx_ops against the numpy reference (nm_onnx.ops.reference).

Randomised with hypothesis: ranks 1-4, every M in {1, 2, 4, 8, 16, 32, 64} (and a large M for the
unstructured top-n path), all N, ties, +-0, +-inf, NaN, empty tensors, float32 and float16. Masks and
shifts must match bit for bit; the GEMM to float tolerance. One and two intra-op threads must agree.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nm_onnx import ops
from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.testing import assert_same, random_values

pytestmark = pytest.mark.skipif(not ops.library_available(), reason="op library not built: run `make ops`")

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SESSIONS: dict = {}


def session(op_type, inputs, outputs, dtype=np.float32, threads=1, **attrs):
    key = (
        op_type,
        tuple(inputs),
        tuple(outputs),
        np.dtype(dtype).name,
        threads,
        tuple(sorted(attrs.items())),
    )
    if key not in _SESSIONS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 4
        ops.register_library(so)
        model = op_model(op_type, inputs, outputs, dtype, **attrs)
        _SESSIONS[key] = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
    return _SESSIONS[key]


patterns = st.sampled_from([1, 2, 4, 8, 16, 32, 64]).flatmap(
    lambda m: st.tuples(st.integers(0, m), st.just(m))
)
leading = st.lists(st.integers(0, 3), min_size=0, max_size=3)
kinds = st.sampled_from(["normal", "ties", "special"])
dtypes = st.sampled_from([np.float32, np.float16])


@SETTINGS
@given(
    nm=patterns,
    lead=leading,
    groups=st.integers(0, 3) | st.sampled_from([4, 8, 16]),
    kind=kinds,
    dtype=dtypes,
    criterion=st.sampled_from(["magnitude", "clact"]),
    scaled=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_nm_mask_matches_reference(nm, lead, groups, kind, dtype, criterion, scaled, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    k = m * groups
    x = random_values(rng, (*lead, k), kind, dtype)
    feeds = {"X": x}
    inputs = ["X"]
    cs = None
    if scaled:
        cs = rng.choice(np.array([0.5, 1.0, 2.0, 3.0]), size=k).astype(dtype)
        feeds["cs"] = cs
        inputs.append("cs")
    y = session("NMMask", inputs, ["Y"], dtype, n=n, m=m, criterion=criterion).run(None, feeds)[0]
    assert_same(y, ref.nm_mask(x, n, m, criterion, cs))


@SETTINGS
@given(
    mode=st.sampled_from(["median", "mean"]),
    lead=leading,
    k=st.integers(0, 9) | st.integers(10, 700),  # wide rows: the median's compaction passes and tails
    kind=kinds,
    dtype=dtypes,
    seed=st.integers(0, 2**31),
)
def test_token_shift_matches_reference(mode, lead, k, kind, dtype, seed):
    x = random_values(np.random.default_rng(seed), (*lead, k), kind, dtype)
    xc, eta = session("TokenShift", ["X"], ["Xc", "eta"], dtype, mode=mode).run(None, {"X": x})
    rxc, reta = ref.token_shift(x, mode)
    assert_same(eta, reta)
    assert_same(xc, rxc)


@SETTINGS
@given(
    nm=patterns,
    lead=leading,
    groups=st.integers(0, 3) | st.sampled_from([4, 8, 16]),
    o=st.integers(0, 5),
    kind=st.sampled_from(["normal", "ties", "special"]),
    dtype=dtypes,
    shift=st.sampled_from(["none", "median", "mean"]),
    vc=st.sampled_from([0, 1]),
    optional=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**31),
)
def test_nm_sparse_matmul_matches_reference(nm, lead, groups, o, kind, dtype, shift, vc, optional, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    k = m * groups
    x = random_values(rng, (*lead, k), kind, dtype)
    b = rng.standard_normal((k, o)).astype(dtype)
    names = ["X", "B", "", "", ""]
    feeds = {"X": x, "B": b}
    extra = {}
    for i, (name, use, length) in enumerate(zip(("cs", "sb", "bias"), optional, (k, o, o))):
        if use:
            v = (
                rng.choice(np.array([0.5, 1.0, 2.0]), size=length)
                if name == "cs"
                else rng.standard_normal(length)
            ).astype(dtype)
            if name == "sb":
                v = b.astype(np.float32).sum(0).astype(dtype)
            names[2 + i] = name
            feeds[name] = v
            extra[name] = v
    while names and names[-1] == "":
        names.pop()
    sess = session("NMSparseMatMul", names, ["Y"], dtype, n=n, m=m, shift=shift, variance_correction=vc)
    y = sess.run(None, feeds)[0]
    expected = ref.nm_sparse_matmul(
        x, b, n, m, shift, vc, extra.get("cs"), extra.get("sb"), extra.get("bias")
    )
    assert y.shape == expected.shape and y.dtype == expected.dtype
    # Tolerance scaled by the magnitude of the terms of each dot product.
    y32, e32 = y.astype(np.float32), expected.astype(np.float32)
    finite = np.isfinite(e32)
    np.testing.assert_array_equal(np.isnan(y32), np.isnan(e32))
    np.testing.assert_array_equal(y32[np.isinf(e32)], e32[np.isinf(e32)])
    # Tolerance: float32 rounding of each dot product, scaled by its terms' magnitudes (and by v).
    x2 = ref._rows(x)
    eta, xh, v = ref.sparse_matmul_parts(x2, n, m, shift, vc, extra.get("cs"))
    b32 = b.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.abs(np.nan_to_num(xh, posinf=0, neginf=0)) @ np.abs(b32)
        if "sb" in extra:
            terms = terms + np.abs(np.nan_to_num(eta, posinf=0, neginf=0))[:, None] * np.abs(
                extra["sb"].astype(np.float32)
            )
        terms = terms * np.nan_to_num(np.abs(v), nan=1, posinf=1)[:, None] + 1.0
    rtol = 1e-5 if dtype == np.float32 else 4e-3
    tol = (rtol * 8 * terms + np.abs(e32).reshape(terms.shape) * rtol).reshape(e32.shape)
    with np.errstate(invalid="ignore"):
        err = np.abs(y32 - e32)
    np.testing.assert_array_less(err[finite], tol[finite] + 1e-6)


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
