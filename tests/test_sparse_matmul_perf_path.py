"""NMSparseMatMul's fast CPU path (custom_ops/cpu/sparse_gemm*) through ONNX Runtime vs the numpy reference.

The op library's kernel selects per token and then calls the sparse GEMM over the kept rows of B:
the streaming (decode) kernel for up to 16 tokens, register tiles beyond. These tests run the real
op in a real session on randomized shapes (odd O for vector tails, T on both sides of 16, K blocks)
for every shift x variance_correction combination, 1 and 2 intra-op threads, and compare with
`nm_onnx.ops.reference.nm_sparse_matmul` within 1e-5 relative (float32; float16 models, whose weight
the GEMM reads as stored, within float16 rounding). The AVX2 and scalar kernels are covered by
re-running the same cases in a subprocess with NM_ONNX_SPARSE_GEMM_ISA capped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nm_onnx import ops
from nm_onnx.ops.graphs import op_model
from nm_onnx.ops.reference import nm_sparse_matmul

pytestmark = pytest.mark.skipif(not ops.library_available(), reason="op library not built: run `make ops`")

PATTERNS = [(2, 4), (8, 16), (16, 32), (1, 4), (4, 8)]
TOKENS = [1, 3, 16, 17, 64]
SHIFTS = ["none", "median", "mean"]
RTOL = {np.float32: 1e-5, np.float16: 2e-3}
DTYPES = (np.float32, np.float16)


def _session(n, m, shift, vc, threads, dtype=np.float32):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    ops.register_library(so)
    model = op_model("NMSparseMatMul", ["X", "B", "", "shift_bias", "bias"], ["Y"], dtype, n=n, m=m,
                     shift=shift, variance_correction=vc)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _close(y, ref):
    """Equal within RTOL of the output's scale (NaN where the reference has NaN)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    finite = np.isfinite(ref)
    rtol = RTOL[np.float16 if y.dtype == np.float16 else np.float32]
    y, ref = y.astype(np.float32), ref.astype(np.float32)
    scale = float(np.abs(ref[finite]).max()) if finite.any() else 1.0
    np.testing.assert_allclose(y[finite], ref[finite], rtol=rtol, atol=rtol * scale)


def check_cases(seed: int, count: int, threads_list=(1, 2), dtypes=DTYPES) -> int:
    """Random cases: every shift x variance_correction, each T of TOKENS, float32 and float16 (the
    float16 weight is read as stored by the GEMM); returns the number checked."""
    rng = np.random.default_rng(seed)
    checked = 0
    for case in range(count):
        n, m = PATTERNS[case % len(PATTERNS)]
        t = TOKENS[(case // len(PATTERNS)) % len(TOKENS)]
        k = m * int(rng.integers(1, 40))
        o = int(rng.choice([1, 7, 15, 17, 33, 255, 513, 1031]))
        x = rng.standard_normal((t, k)).astype(np.float32) + np.float32(rng.normal())
        b = (rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32)
        sb = b.sum(axis=0).astype(np.float32)
        bias = rng.standard_normal(o).astype(np.float32)
        for dtype in dtypes:
            feeds = {"X": x.astype(dtype), "B": b.astype(dtype), "shift_bias": sb.astype(dtype),
                     "bias": bias.astype(dtype)}
            for shift in SHIFTS:
                for vc in (0, 1):
                    ref = nm_sparse_matmul(feeds["X"], feeds["B"], n, m, shift=shift, variance_correction=vc,
                                           shift_bias=feeds["shift_bias"], bias=feeds["bias"])
                    for threads in threads_list:
                        (y,) = _session(n, m, shift, vc, threads, dtype).run(None, feeds)
                        _close(y, ref)
                        checked += 1
    return checked


@pytest.mark.parametrize("seed", [0, 1])
def test_random_shapes_all_mitigations(seed):
    assert check_cases(seed, 25) == 25 * len(DTYPES) * len(SHIFTS) * 2 * 2


@pytest.mark.parametrize("t", [1, 4, 16, 40])
def test_wide_rows_and_k_blocks(t):
    # O large enough for several column chunks, K large enough that a K block is a part of the kept rows.
    rng = np.random.default_rng(t)
    k, o = 2048, 2500
    x = rng.standard_normal((t, k)).astype(np.float32)
    b = (rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32)
    for (n, m), dtype in [((8, 16), np.float32), ((2, 4), np.float32), ((8, 16), np.float16)]:
        xd, bd = x.astype(dtype), b.astype(dtype)
        ref = nm_sparse_matmul(xd, bd, n, m)
        for threads in (1, 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            ops.register_library(so)
            model = op_model("NMSparseMatMul", ["X", "B"], ["Y"], dtype, n=n, m=m)
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            (y,) = sess.run(None, {"X": xd, "B": bd})
            _close(y, ref)


def test_leading_axes_reshape():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    b = rng.standard_normal((64, 19)).astype(np.float32)
    so = ort.SessionOptions()
    ops.register_library(so)
    sess = ort.InferenceSession(op_model("NMSparseMatMul", ["X", "B"], ["Y"], n=8, m=16).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"X": x, "B": b})
    _close(y, nm_sparse_matmul(x, b, 8, 16))


@pytest.mark.parametrize("t", [1, 20])
def test_kept_nan_and_zero_times_inf_propagate(t):
    # A kept NaN activation propagates to every output of its row; a kept exact 0 meeting an inf weight
    # gives NaN (0 * inf), as in a dense matmul over the kept rows: no kept entry is skipped for being 0.
    k, o = 32, 40
    x = np.ones((t, k), np.float32)
    x[0, 5] = np.nan
    x[-1, 16:20] = 0.0  # a 2:4 group of zeros: indices 16 and 17 are kept (lower index wins ties)
    b = np.ones((k, o), np.float32)
    b[16, 3] = np.inf
    so = ort.SessionOptions()
    ops.register_library(so)
    sess = ort.InferenceSession(op_model("NMSparseMatMul", ["X", "B"], ["Y"], n=2, m=4).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"X": x, "B": b})
    assert np.isnan(y[0]).all()
    assert np.isnan(y[-1, 3])
    if t > 1:
        assert np.isfinite(y[-1, :3]).all() and np.isfinite(y[-1, 4:]).all()
        # other rows keep feature 16 too (all ties) with x = 1: 1 * inf = inf, not NaN
        assert (y[1:-1, 3] == np.inf).all() and np.isfinite(np.delete(y[1:-1], 3, axis=1)).all()


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_kernels(isa):
    # The kernel is chosen once per process, so the capped ISA runs in a fresh interpreter.
    if isa == "avx2" and not _cpu_has("avx2"):
        pytest.skip("CPU has no AVX2")
    code = (
        "import runpy, sys; m = runpy.run_path(sys.argv[1]); "
        "print(m['check_cases'](7, 10, threads_list=(1, 2)))"
    )
    env = dict(os.environ, NM_ONNX_SPARSE_GEMM_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code, __file__], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(10 * len(DTYPES) * len(SHIFTS) * 2 * 2)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build custom_ops/tests' harness")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_harness_kernels_without_ort(isa, tmp_path):
    # The sparse GEMM alone (custom_ops/tests/harness.py): N:M and unstructured kept sets, including a
    # kept block too wide for the packing buffer, vs a float64 numpy product.
    if isa != "scalar" and not _cpu_has({"avx512": "avx512f", "avx2": "avx2"}[isa]):
        pytest.skip(f"CPU has no {isa}")
    harness = Path(__file__).resolve().parents[1] / "custom_ops" / "tests" / "harness.py"
    out = subprocess.run([sys.executable, str(harness), "check", "--build-dir", str(tmp_path)], check=False,
                         env=dict(os.environ, NM_ONNX_SPARSE_GEMM_ISA=isa), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "check ok" in out.stdout


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc")
def test_cuda_sparse_gemv_builds_and_checks(tmp_path):
    # Compiles custom_ops/cuda/sparse_gemv.cu for sm_80 and sm_90 with its standalone check
    # (custom_ops/tests/sparse_gemv_test.cu); runs the check where a GPU is present (exit 77: none).
    root = Path(__file__).resolve().parents[1] / "custom_ops"
    exe = tmp_path / "sparse_gemv_test"
    build = subprocess.run(
        [_nvcc(), "-std=c++17", "-O2", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
         "arch=compute_90,code=sm_90", str(root / "tests" / "sparse_gemv_test.cu"),
         str(root / "cuda" / "sparse_gemv.cu"), "-o", str(exe)],
        check=False, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 77), run.stdout + run.stderr


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


if __name__ == "__main__":  # pragma: no cover - manual run
    print(check_cases(0, 5))
