"""Shared helpers of the test suite (pytest loads this file first; tests import its helpers by name).

Op tests: `kernel_session` and `function_session` give one cached ONNX Runtime session per single-node
op model (`nm_onnx.ops.graphs.op_model`): the first with the op library registered (the C++ kernels),
the second without it (ORT inlines the standard-ONNX function bodies of the portable model).
`needs_library` skips a test, naming the build command, when the library is missing. The hypothesis
case strategies and `check_*` functions run one op through either session against the numpy
reference (tests/test_ops_kernels.py and tests/test_ops_functions.py); `sparse_matmul_inputs` and
`assert_gemm_close` build and judge NMSparseMatMul cases.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import strategies as st

from nm_onnx import ops
from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import DEFAULT_OPSET, op_model
from nm_onnx.ops.schemas import SCHEMAS
from nm_onnx.ops.testing import assert_same, random_values

needs_library = pytest.mark.skipif(not ops.library_available(), reason="op library not built: run `make ops`")

_SESSIONS: dict = {}


def op_session(
    op_type, inputs, outputs, dtype=np.float32, *, library, threads=1, opset=DEFAULT_OPSET, **attrs
):
    """A cached CPU session on one `op_type` node ("" in `inputs` omits an optional input)."""
    key = (op_type, tuple(inputs), tuple(outputs), np.dtype(dtype).name, library, threads, opset)
    key += tuple(sorted(attrs.items()))
    if key not in _SESSIONS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 4
        if library:
            ops.register_library(so)
        model = op_model(op_type, inputs, outputs, dtype, opset=opset, functions=not library, **attrs)
        _SESSIONS[key] = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
    return _SESSIONS[key]


def kernel_session(op_type, inputs, outputs, dtype=np.float32, threads=1, **attrs):
    """The op library's C++ kernel (the model carries no function bodies)."""
    return op_session(op_type, inputs, outputs, dtype, library=True, threads=threads, **attrs)


def function_session(op_type, inputs, outputs, dtype=np.float32, opset=DEFAULT_OPSET, **attrs):
    """The portable model WITHOUT the op library: ORT must inline the function body."""
    return op_session(op_type, inputs, outputs, dtype, library=False, opset=opset, **attrs)


patterns = st.sampled_from([1, 2, 4, 8, 16, 32, 64]).flatmap(
    lambda m: st.tuples(st.integers(0, m), st.just(m))
)
leading = st.lists(st.integers(0, 3), min_size=0, max_size=3)
kinds = st.sampled_from(["normal", "ties", "special"])
dtypes = st.sampled_from([np.float32, np.float16])
seeds = st.integers(0, 2**31)


# ----- one op against the numpy reference: the cases and checks shared by the kernel and function tests
def nm_mask_cases(groups):
    return st.fixed_dictionaries(
        {
            "nm": patterns,
            "lead": leading,
            "groups": groups,
            "kind": kinds,
            "dtype": dtypes,
            "criterion": st.sampled_from(["magnitude", "clact"]),
            "scaled": st.booleans(),
            "seed": seeds,
        }
    )


def check_nm_mask(session, nm, lead, groups, kind, dtype, criterion, scaled, seed):
    """NMMask through `session` (kernel_session or function_session) equals the reference bit for bit."""
    n, m = nm
    rng = np.random.default_rng(seed)
    x = random_values(rng, (*lead, m * groups), kind, dtype)
    feeds = {"X": x}
    if scaled:
        feeds["channel_scale"] = rng.choice(np.array([0.5, 1.0, 2.0, 3.0]), size=m * groups).astype(dtype)
    sess = session("NMMask", node_inputs("NMMask", feeds), ["Y"], dtype, n=n, m=m, criterion=criterion)
    assert_same(sess.run(None, feeds)[0], ref.nm_mask(x, n, m, criterion, feeds.get("channel_scale")))


def token_shift_cases(k):
    modes = st.sampled_from(["median", "mean"])
    return st.fixed_dictionaries(
        {"mode": modes, "lead": leading, "k": k, "kind": kinds, "dtype": dtypes, "seed": seeds}
    )


def check_token_shift(session, mode, lead, k, kind, dtype, seed, exact_mean=True):
    """TokenShift equals the reference bit for bit (the mean to float32 rounding unless `exact_mean`)."""
    x = random_values(np.random.default_rng(seed), (*lead, k), kind, dtype)
    xc, eta = session("TokenShift", ["X"], ["Xc", "eta"], dtype, mode=mode).run(None, {"X": x})
    rxc, reta = ref.token_shift(x, mode)
    if mode == "median" or exact_mean:
        assert_same(eta, reta)
        assert_same(xc, rxc)
    else:  # float64 sums in another order: equal up to the float32 rounding of the mean
        np.testing.assert_allclose(eta.astype(np.float32), reta.astype(np.float32), rtol=1e-6, atol=1e-7)


def sparse_matmul_cases(groups, o, kinds=kinds):
    return st.fixed_dictionaries(
        {
            "nm": patterns,
            "lead": leading,
            "groups": groups,
            "o": o,
            "kind": kinds,
            "dtype": dtypes,
            "shift": st.sampled_from(["none", "median", "mean"]),
            "vc": st.sampled_from([0, 1]),
            "optional": st.tuples(st.booleans(), st.booleans(), st.booleans()),
            "seed": seeds,
        }
    )


def check_nm_sparse_matmul(session, nm, lead, groups, o, kind, dtype, shift, vc, optional, seed):
    """NMSparseMatMul equals the reference: same NaN/inf entries, the rest to GEMM tolerance."""
    n, m = nm
    rng = np.random.default_rng(seed)
    k = m * groups
    x = random_values(rng, (*lead, k), kind, dtype)
    b = rng.standard_normal((k, o)).astype(dtype)
    names, feeds, keywords = sparse_matmul_inputs(rng, x, b, optional)
    sess = session("NMSparseMatMul", names, ["Y"], dtype, n=n, m=m, shift=shift, variance_correction=vc)
    expected = ref.nm_sparse_matmul(x, b, n, m, shift, vc, **keywords)
    assert_gemm_close(sess.run(None, feeds)[0], expected, x, b, n, m, shift, vc, **keywords)


OPTIONAL_INPUTS = ("channel_scale", "shift_bias", "bias")


def node_inputs(op_type, feeds):
    """The node's input names for `feeds` (keyed by the op's input names): "" for an omitted input."""
    names = [name if name in feeds else "" for name in SCHEMAS[op_type].input_names]
    while names and not names[-1]:
        names.pop()
    return names


def sparse_matmul_inputs(rng, x, b, use):
    """Node inputs, feeds and reference keywords of an NMSparseMatMul case on X and B.

    `use` flags (channel_scale, shift_bias, bias) the optional inputs; `shift_bias` is the column
    sums of B; the keywords map every optional input to its value or None (for
    `ref.nm_sparse_matmul(..., **keywords)` and `assert_gemm_close`).
    """
    k, o = b.shape
    with np.errstate(invalid="ignore", over="ignore"):  # B may hold inf and NaN
        shift_bias = b.astype(np.float32).sum(0)
    values = {
        "channel_scale": rng.choice(np.array([0.5, 1.0, 2.0]), size=k),
        "shift_bias": shift_bias,
        "bias": rng.standard_normal(o),
    }
    feeds, keywords = {"X": x, "B": b}, dict.fromkeys(OPTIONAL_INPUTS)
    for name, wanted in zip(OPTIONAL_INPUTS, use):
        if wanted:
            feeds[name] = keywords[name] = values[name].astype(x.dtype)
    return node_inputs("NMSparseMatMul", feeds), feeds, keywords


def assert_gemm_close(y, expected, x, b, n, m, shift="none", vc=0, channel_scale=None, shift_bias=None, **_):
    """NMSparseMatMul outputs agree: the same NaN and inf entries, finite ones to float tolerance.

    The tolerance is the float32 (float16: 4e-3) rounding of each dot product scaled by the magnitude
    of its terms (and by v); non-finite entries of B count as 0 there, so a pruned inf row of B
    (never read) does not blow the tolerance up.
    """
    assert y.shape == expected.shape and y.dtype == expected.dtype, (y.shape, y.dtype, expected.shape)
    y32, e32 = y.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(y32), np.isnan(e32))
    np.testing.assert_array_equal(y32[np.isinf(e32)], e32[np.isinf(e32)])
    eta, xh, v = ref.sparse_matmul_parts(ref._rows(x), n, m, shift, vc, channel_scale)
    finite_b = np.abs(np.nan_to_num(b.astype(np.float32), nan=0, posinf=0, neginf=0))
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.abs(np.nan_to_num(xh, posinf=0, neginf=0)) @ finite_b
        if shift_bias is not None:
            sb = np.abs(np.nan_to_num(shift_bias.astype(np.float32), nan=0, posinf=0, neginf=0))
            terms = terms + np.abs(np.nan_to_num(eta, posinf=0, neginf=0))[:, None] * sb
        terms = terms * np.nan_to_num(np.abs(v), nan=1, posinf=1)[:, None] + 1.0
        rtol = 1e-5 if y.dtype == np.float32 else 4e-3
        tol = (rtol * 8 * terms + np.abs(e32).reshape(terms.shape) * rtol).reshape(e32.shape)
        err = np.abs(y32 - e32)
    finite = np.isfinite(e32)
    np.testing.assert_array_less(err[finite], tol[finite] + 1e-6)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread: the 2-core test machines are shared, and OpenMP barriers stall under load."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_cli(*args, env=None, timeout=900):
    """`python -m nm_onnx ARGS` in a subprocess (the real entry point): CompletedProcess with text."""
    import os
    import subprocess
    import sys

    full_env = None if env is None else {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "nm_onnx", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def error_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines (a user error must be exactly one)."""
    return [ln for ln in stderr.splitlines() if ln.strip()]


SHARED_CALIBRATED = {"name": "shared-cal", "pattern": "8:16", "criterion": "wanda", "shift": "learned",
                     "scale_shift": True, "share_selection": True}  # every kind of group constant


@pytest.fixture(scope="session")
def shared_artifact(tmp_path_factory):
    """A calibration artifact of a shared recipe (wanda, learned shift, scale_shift) on the tiny Llama."""
    import torch
    from models_cache import tiny_hf

    from nm_onnx.calibration import calibrate, load_artifact
    from nm_onnx.models import load_hf_model
    from nm_onnx.recipe import SparsityRecipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = load_hf_model(tiny_hf("llama"))
        windows = np.random.default_rng(0).integers(0, 512, size=(6, 48))
        out = tmp_path_factory.mktemp("cal") / "art"
        calibrate(model, SparsityRecipe.from_dict(SHARED_CALIBRATED), windows, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return load_artifact(out)
