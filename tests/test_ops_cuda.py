"""CUDA kernels of the op library: against the numpy reference when the CUDA execution provider is
available (skipped with a reason otherwise), plus a check that the library carries the CUDA kernels
whenever nvcc was present at build time (the CI machine compiles them even without a GPU).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from nm_onnx import ops
from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.testing import assert_same, random_values

HAS_LIBRARY = ops.library_available()
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
NVCC = (
    os.environ.get("CUDACXX")
    or shutil.which("nvcc")
    or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
)

needs_gpu = pytest.mark.skipif(
    not (HAS_LIBRARY and HAS_CUDA_EP),
    reason="needs the op library and onnxruntime's CUDAExecutionProvider (onnxruntime-gpu and a GPU)",
)


@pytest.mark.skipif(not HAS_LIBRARY, reason="op library not built: run `make ops`")
@pytest.mark.skipif(NVCC is None or os.environ.get("NM_ONNX_CUDA") == "0", reason="no nvcc: CPU-only build")
def test_library_carries_cuda_kernels_when_nvcc_is_present():
    with open(ops.library_path(), "rb") as f:
        assert b"CUDAExecutionProvider" in f.read()


def cuda_session(op_type, inputs, outputs, dtype, **attrs):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ops.register_library(so)
    model = op_model(op_type, inputs, outputs, dtype, **attrs)
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("nm", [(2, 4), (8, 16), (16, 32), (3, 64), (100, 256)])
@pytest.mark.parametrize("criterion", ["magnitude", "clact"])
def test_cuda_nm_mask_matches_reference(dtype, nm, criterion):
    n, m = nm
    rng = np.random.default_rng(n * 100 + m)
    x = random_values(rng, (3, 5, 2 * m), "special", dtype)
    x[1] = random_values(rng, (5, 2 * m), "ties", dtype)
    y = cuda_session("NMMask", ["X"], ["Y"], dtype, n=n, m=m, criterion=criterion).run(None, {"X": x})[0]
    assert_same(y, ref.nm_mask(x, n, m, criterion))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["median", "mean"])
@pytest.mark.parametrize("k", [0, 1, 7, 64, 1000])
def test_cuda_token_shift_matches_reference(dtype, mode, k):
    x = random_values(np.random.default_rng(k), (4, 3, k), "special", dtype)
    xc, eta = cuda_session("TokenShift", ["X"], ["Xc", "eta"], dtype, mode=mode).run(None, {"X": x})
    rxc, reta = ref.token_shift(x, mode)
    if mode == "median":
        assert_same(eta, reta)
        assert_same(xc, rxc)
    else:  # parallel float64 sum: equal up to the float32 rounding of the mean
        np.testing.assert_allclose(eta.astype(np.float32), reta.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shift", ["none", "median", "mean"])
@pytest.mark.parametrize("vc", [0, 1])
def test_cuda_nm_sparse_matmul_matches_reference(dtype, shift, vc):
    rng = np.random.default_rng(1)
    x = random_values(rng, (2, 7, 64), "normal", dtype)
    b = random_values(rng, (64, 40), "normal", dtype)
    sb = b.astype(np.float32).sum(0).astype(dtype)
    bias = random_values(rng, (40,), "normal", dtype)
    feeds = {"X": x, "B": b, "sb": sb, "bias": bias}
    sess = cuda_session(
        "NMSparseMatMul",
        ["X", "B", "", "sb", "bias"],
        ["Y"],
        dtype,
        n=8,
        m=16,
        shift=shift,
        variance_correction=vc,
    )
    y = sess.run(None, feeds)[0]
    expected = ref.nm_sparse_matmul(x, b, 8, 16, shift, vc, None, sb, bias)
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), rtol=tol, atol=tol * 10)


@pytest.mark.cuda
@needs_gpu
def test_cuda_bfloat16_nm_mask_matches_float32_reference():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(5)
    x = random_values(rng, (6, 64), "ties").astype(ml_dtypes.bfloat16)
    y = cuda_session("NMMask", ["X"], ["Y"], ml_dtypes.bfloat16, n=8, m=16).run(None, {"X": x})[0]
    expected = ref.nm_mask(x.astype(np.float32), 8, 16)
    np.testing.assert_array_equal(y.astype(np.float32), expected)
