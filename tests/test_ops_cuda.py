"""CUDA kernels of the op library, in two halves.

1. Through ONNX Runtime's CUDA EP (needs onnxruntime-gpu and a GPU, so skipped here with the reason):
   the cases of tools/gpu_check.py against the numpy reference, in sessions with CPU fallback disabled
   and ORT profiling checking that each nm_onnx node ran on CUDAExecutionProvider, so a missing or
   misregistered CUDA kernel fails these tests instead of quietly running the CPU kernel.
2. The host side of the one-run GPU check (tools/gpu_check.sh, tools/gpu_check.py; issue 16), which
   runs anywhere: its case list, its comparison (through the same code path against the CPU kernels,
   and on planted errors), its expected values for non-finite weights, the placement check, the nvcc
   build of the harness and its "no CUDA device" exit, and the failure of a strict CUDA session here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nm_onnx import ops
from nm_onnx.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gc = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(_spec))  # dataclasses need the entry
_spec.loader.exec_module(gc)

HAS_LIBRARY = ops.library_available()
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
NVCC = (
    os.environ.get("CUDACXX")
    or shutil.which("nvcc")
    or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
)
OPS = ("TokenShift", "NMMask", "NMSparseMatMul")

needs_library = pytest.mark.skipif(not HAS_LIBRARY, reason="op library not built: run `make ops`")
needs_cuda_ep = pytest.mark.skipif(
    not (HAS_LIBRARY and HAS_CUDA_EP),
    reason="needs the op library and onnxruntime's CUDAExecutionProvider (onnxruntime-gpu and a GPU; this "
    f"onnxruntime has {', '.join(ort.get_available_providers())}); on a GPU without onnxruntime-gpu the CUDA "
    "kernels are checked by tools/gpu_check.sh",
)


def _torch_sees_a_gpu() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@needs_library
@pytest.mark.skipif(NVCC is None or os.environ.get("NM_ONNX_CUDA") == "0", reason="no nvcc: CPU-only build")
def test_library_carries_cuda_kernels_when_nvcc_is_present():
    with open(ops.library_path(), "rb") as f:
        assert b"CUDAExecutionProvider" in f.read()


# ----------------------------------------------------------------------------------------------- CUDA EP
@pytest.mark.cuda
@needs_cuda_ep
@pytest.mark.parametrize("dtype", gc.DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_cuda_ep_kernels_match_reference(op, dtype):
    case_list = [c for c in gc.cases(quick=True, dtypes=(dtype,)) if c.op == op]
    result = gc.check_all(gc.OrtBackend(gc.ORT_CUDA), case_list)
    assert result["cases"] == len(case_list) > 0
    assert result["failed"] == 0, result["failures"][:5]


@needs_library
@pytest.mark.skipif(
    HAS_CUDA_EP, reason="this onnxruntime has the CUDA EP: test_cuda_ep_kernels_match_reference runs"
)
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_cuda_ep_cases_fail_rather_than_run_on_the_cpu():
    # No CUDA kernel can run here: a strict CUDA session (what the CUDA EP tests use) must refuse the
    # nodes instead of running the CPU kernels, so each case is a failure, never a pass.
    case_list = [c for c in gc.cases(quick=True, dtypes=("float32",)) if c.inputs["X"].size][:6]
    result = gc.check_all(gc.OrtBackend(gc.ORT_CUDA), case_list)
    assert result["failed"] == result["cases"] == len(case_list) > 0
    problems = [p for f in result["failures"] for p in f["problems"]]
    assert all("fallback to CPU EP has been explicitly disabled" in p for p in problems), problems


def _profiled_cpu_session(prefix, op, dtype="float32", **attrs):
    so = ort.SessionOptions()
    ops.register_library(so)
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix / op)
    model = gc.ort_model(op, list(gc.INPUTS[op][:1]) if op != "NMSparseMatMul" else ["X", "B"], dtype, attrs)
    return ort.InferenceSession(model.SerializeToString(), so, providers=[gc.ORT_CPU])


@needs_library
@pytest.mark.parametrize("shape", [(3, 8), (0, 8)])
def test_placement_check_reads_where_each_node_ran(shape, tmp_path):
    x = np.ones(shape, np.float32)
    sess = _profiled_cpu_session(tmp_path, "NMMask", "float16", n=2, m=4)  # Cast nodes around it do not count
    sess.run(None, {"X": x})
    gc.check_placement(sess, "NMMask", gc.ORT_CPU)
    sess = _profiled_cpu_session(tmp_path, "NMSparseMatMul", n=2, m=4)
    sess.run(None, {"X": x, "B": np.ones((8, 3), np.float32)})
    with pytest.raises(RuntimeError, match="NMSparseMatMul node ran on CPUExecutionProvider, not on CUDA"):
        gc.check_placement(sess, "NMSparseMatMul", gc.ORT_CUDA)
    with pytest.raises(RuntimeError, match="never ran"):
        gc.check_placement(_profiled_cpu_session(tmp_path, "TokenShift"), "TokenShift", gc.ORT_CPU)


# ----------------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_cases_cover_the_issue():
    case_list = gc.cases()
    masks = {(c.attrs["n"], c.attrs["m"]) for c in case_list if c.op == "NMMask"}
    exact = {(c.attrs["n"], c.attrs["m"]) for c in case_list if c.op == "NMSparseMatMul" and c.exact}
    for m in (4, 8, 16, 32, 64):
        every_n = {(n, m) for n in range(m + 1)}
        assert every_n <= masks and every_n <= exact, m
    for op in OPS:
        for dtype in gc.DTYPES:
            mine = [c for c in case_list if c.op == op and c.dtype == dtype]
            xs = [c.inputs["X"] for c in mine]
            assert {0, 1, 512} <= {int(np.prod(x.shape[:-1])) for x in xs}, (op, dtype)
            assert any(x.shape[-1] == 0 for x in xs), (op, dtype)
            values = np.concatenate([x.ravel() for x in xs])
            assert np.isnan(values).any() and np.isposinf(values).any() and np.isneginf(values).any(), (
                op,
                dtype,
            )
            assert (np.signbit(values) & (values == 0)).any(), (op, dtype)  # -0
            assert any(x.size > 8 and len(np.unique(x)) <= 6 for x in xs), (op, dtype)  # ties
            if op != "TokenShift":
                assert {"channel_scale" in c.inputs for c in mine} == {True, False}, (op, dtype)
            if op == "NMSparseMatMul":  # both sides of the decode path (T <= 16), one and several tiles of O
                shapes = {(c.inputs["X"].shape[0] <= 16, c.inputs["B"].shape[1] > 512) for c in mine}
                assert shapes == {(True, True), (True, False), (False, True), (False, False)}, dtype
                assert any(c.inputs["B"].shape[1] % 2 and c.inputs["B"].shape[1] > 1 for c in mine)  # odd O
                assert any(c.inputs["B"].shape[1] == 0 for c in mine)
                assert (
                    {"bias" in c.inputs for c in mine}
                    == {"shift_bias" in c.inputs for c in mine}
                    == {True, False}
                )
                non_finite = [c for c in mine if not np.isfinite(c.inputs["B"]).all()]
                assert any(
                    np.isfinite(gc.reference(c)["Y"]).all() for c in non_finite
                )  # inf/NaN in pruned rows
                assert any(
                    np.isnan(gc.reference(c)["Y"]).any() for c in non_finite
                )  # and in rows that are read


@needs_library
def test_cpu_kernels_pass_the_gpu_check_cases():
    # The comparison code of the GPU check, run against the CPU kernels (the same cases, references and
    # tolerances, only float32 / float16: no bfloat16 on CPU).
    result = gc.check_all(gc.OrtBackend(gc.ORT_CPU), gc.cases(quick=True))
    assert result["failed"] == 0, result["failures"][:5]
    assert set(result["by_op"]) == {f"{op} {dt}" for op in OPS for dt in ("float32", "float16")}
    assert result["skipped"] > 0  # bfloat16


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (its bfloat16 cast)")
def test_round_to_matches_torch_casts():
    # The reference's float16 / bfloat16 results are rounded by round_to; the device rounds with the
    # same rule (round to nearest even), as torch's casts do.
    import torch

    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            rng.standard_normal(5000) * 10.0 ** rng.integers(-40, 39, 5000),
            gc.testing.SPECIALS,
            [3.4e38, 6.6e4, 6.5519e4, 1e-8, -1e-45],
        ]
    ).astype(np.float32)
    for dtype, tdt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        with np.errstate(over="ignore"):
            want = torch.from_numpy(x).to(tdt).float().numpy()
        got = gc.round_to(x, dtype)
        np.testing.assert_array_equal(got, want)  # NaN equals NaN; the sign of zeros checked next
        assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()


def _first(case_list, op, pred=lambda c: True):
    return next(c for c in case_list if c.op == op and c.inputs["X"].size and pred(c))


def test_compare_flags_planted_errors():
    case_list = gc.cases(quick=True)

    def problems(case, edit):
        want = gc.reference(case)
        got = {k: v.copy() for k, v in want.items()}
        edit(got)
        return gc.compare(case, got, want)

    def set_at(name, where, value):
        def edit(got):
            flat = got[name].reshape(-1)
            flat[np.flatnonzero(where(flat))[0]] = value

        return edit

    mask = _first(
        case_list,
        "NMMask",
        lambda c: (
            0 < c.attrs["n"] < c.attrs["m"]
            and c.dtype == "float32"
            and np.isfinite(c.inputs["X"]).all()
            and (c.inputs["X"] != 0).all()
        ),
    )
    assert problems(mask, lambda got: None) == []
    assert problems(mask, set_at("Y", lambda y: np.isfinite(y) & (y != 0), 0.0))  # a kept entry pruned
    assert problems(mask, set_at("Y", lambda y: (y == 0) & ~np.signbit(y), -0.0))  # +0 vs -0
    assert problems(mask, set_at("Y", lambda y: np.isfinite(y), np.nan))
    median = _first(case_list, "TokenShift", lambda c: c.attrs["mode"] == "median")
    assert problems(
        median, lambda got: got["eta"].reshape(-1).__setitem__(0, np.nextafter(got["eta"].flat[0], 9))
    )
    dense = _first(
        case_list, "NMSparseMatMul", lambda c: not c.exact and np.isfinite(gc.reference(c)["Y"]).all()
    )
    tol = gc.TOLERANCE[dense.dtype] * gc._scale(gc.reference(dense)["Y"])
    assert problems(dense, lambda got: got["Y"].reshape(-1).__setitem__(0, got["Y"].flat[0] + tol / 4)) == []
    assert problems(dense, lambda got: got["Y"].reshape(-1).__setitem__(0, got["Y"].flat[0] + 2 * tol))
    assert problems(dense, lambda got: got.__setitem__("Y", got["Y"][:-1]))  # shape
    exact = _first(
        case_list,
        "NMSparseMatMul",
        lambda c: c.exact and c.dtype == "float32" and c.attrs["n"] > 0 and np.isfinite(c.inputs["X"]).all(),
    )

    def one_ulp_up(got):  # within any arithmetic tolerance, but not exact
        flat = got["Y"].reshape(-1)
        j = np.flatnonzero(flat != 0)[0]
        flat[j] = np.nextafter(flat[j], np.float32(np.inf))

    assert problems(exact, one_ulp_up)


def test_sparse_matmul_expected_reads_only_kept_rows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    b = rng.standard_normal((32, 6)).astype(np.float32)
    b[rng.choice(32, 6, replace=False), rng.choice(6, 6)] = [np.inf, -np.inf, np.nan, np.inf, np.inf, -np.inf]
    sb, bias = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    args = (2, 4, "median", 1, None, sb, bias)
    y = gc.sparse_matmul_expected(x, b, *args)
    # Per token, the reference with that token's pruned rows of B zeroed: the same value by definition.
    for t in range(5):
        eta = ref.row_shift(x[t : t + 1], "median")
        keep = ref.nm_keep_mask(x[t : t + 1] - eta[:, None], 2, 4)[0]
        bt = np.where(keep[:, None], b, np.float32(0))
        np.testing.assert_allclose(y[t], ref.nm_sparse_matmul(x[t : t + 1], bt, *args)[0], rtol=1e-6)
    assert not np.isfinite(y).all() and np.isfinite(y).any()
    # A kept 0 meeting an inf weight is NaN (IEEE on the kept terms); pruned inf rows stay unread.
    x0 = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)  # 2:4 keeps the 1 and the lowest-index 0
    b0 = np.array([[np.inf], [np.inf], [np.inf], [2.0]], np.float32)
    assert np.isnan(gc.sparse_matmul_expected(x0, b0, 2, 4)).all()
    b0[0] = 1.0
    np.testing.assert_array_equal(gc.sparse_matmul_expected(x0, b0, 2, 4), [[2.0]])


def _gpu_check_sh(out, tmp_path, **env):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUILD": str(tmp_path / "build"), **env}
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.skipif(_torch_sees_a_gpu(), reason="a CUDA device is present: run tools/gpu_check.sh itself")
def test_gpu_check_builds_and_exits_no_cuda_device(tmp_path):
    # One architecture (half the nvcc time of the default "80 90"); the device run builds both.
    p = _gpu_check_sh(tmp_path / "out", tmp_path, GPU_CHECK_ARCHS="80")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "no_cuda_device"
    assert report["message"].startswith("no CUDA device")
    assert report["sparse_gemv_test"]["rc"] == 77  # the GEMV test binary ran and skipped
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: no_cuda_device") and "no CUDA device" in md
    # The harness's C entry points answer without a device: no work is a success, work a CUDA error.
    lib_path = tmp_path / "build" / "libnm_onnx_gpu_check.so"
    lib = gc.load_harness(lib_path)
    assert lib.nm_check_device_count() == 0
    err = gc.ctypes.create_string_buffer(256)
    assert lib.nm_check_nm_mask(0, None, None, None, 0, 8, 2, 4, 0, None, err, 256) == 0
    assert (
        lib.nm_check_nm_sparse_matmul(
            1, None, None, None, None, None, None, 1, 16, 5, 8, 16, 1, 1, None, err, 256
        )
        == 1
    )
    assert err.value.startswith(b"cudaMallocAsync: ")
    # --require-device turns the same situation into exit 3.
    rc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu_check.py"),
            "--out",
            str(tmp_path / "req"),
            "--lib",
            str(lib_path),
            "--require-device",
        ],
        capture_output=True,
        timeout=300,
    ).returncode
    assert rc == 3


def test_gpu_check_reports_a_failed_build(tmp_path):
    p = _gpu_check_sh(tmp_path / "out", tmp_path, CUDACXX="false")
    assert p.returncode == 2, p.stdout + p.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "build_failed"
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# GPU check: build_failed")
