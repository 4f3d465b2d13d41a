"""Standalone check and timing of the CPU sparse GEMM (no op library, no ORT custom op needed).

Builds custom_ops/tests/build_harness.sh's library, checks it against numpy on random N:M indices and
times it against ONNX Runtime's dense MatMul on the same inputs. For kernel development only; the
real tests and benchmark go through the op library (tests/test_sparse_matmul_perf_path.py,
benchmarks/sparse_matmul.py). Usage: python custom_ops/tests/harness.py [check|bench] [--threads N]
Set NM_ONNX_SPARSE_GEMM_ISA=scalar|avx2|avx512 to pick the kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load(build_dir: Path | None = None):
    build_dir = build_dir or Path(tempfile.gettempdir()) / "nm_onnx_sparse_gemm_harness"
    out = subprocess.run(["bash", str(HERE / "build_harness.sh"), str(build_dir)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lib = ctypes.CDLL(out)
    f = lib.nm_sparse_gemm_f32
    f.restype = None
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    f.argtypes = [p, p, i64, i64, i64, p, i64, p, ctypes.c_int]
    return f


def nm_indices(x: np.ndarray, n: int, m: int) -> np.ndarray:
    t, k = x.shape
    g = np.abs(x).reshape(t, k // m, m)
    top = np.sort(np.argsort(-g, axis=-1, kind="stable")[..., :n], axis=-1)
    return (top + (np.arange(k // m) * m)[None, :, None]).reshape(t, -1).astype(np.int32)


def call(f, x, idx, b, threads=1):
    t, k = x.shape
    o = b.shape[1]
    y = np.empty((t, o), np.float32)
    f(x.ctypes.data, idx.ctypes.data, t, k, idx.shape[1], b.ctypes.data, o, y.ctypes.data, threads)
    return y


def check(f):
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, m = [(2, 4), (8, 16), (16, 32), (1, 4), (3, 8)][trial % 5]
        t = int(rng.choice([1, 2, 3, 5, 16, 17, 64, 70]))
        k = m * int(rng.integers(1, 20))
        o = int(rng.integers(1, 700))
        x = rng.standard_normal((t, k)).astype(np.float32)
        b = rng.standard_normal((k, o)).astype(np.float32)
        idx = nm_indices(x, n, m)
        mask = np.zeros_like(x)
        np.put_along_axis(mask, idx.astype(np.int64), 1.0, axis=1)
        ref = (x.astype(np.float64) * mask) @ b.astype(np.float64)
        for th in (1, 2):
            y = call(f, x, idx, b, th)
            err = np.abs(y - ref).max() / max(1e-30, np.abs(ref).max())
            assert err < 1e-5, (trial, t, k, o, n, m, err)
    # Unstructured kept sets (any ascending indices): a kept block spans more rows than the packing
    # buffer holds, which exercises the unpacked path of the prefill kernel.
    for t, k, o in [(40, 4096, 70), (3, 2048, 100)]:
        x = rng.standard_normal((t, k)).astype(np.float32)
        b = rng.standard_normal((k, o)).astype(np.float32)
        idx = np.sort(np.argsort(-np.abs(x), axis=1)[:, : k // 2], axis=1).astype(np.int32)
        idx[0], idx[-1] = np.arange(k // 2), np.arange(k // 2, k)  # first vs last half: far-apart rows
        xm = np.zeros_like(x, dtype=np.float64)
        np.put_along_axis(xm, idx.astype(np.int64), np.take_along_axis(x, idx.astype(np.int64), 1), axis=1)
        ref = xm @ b.astype(np.float64)
        y = call(f, x, idx, b, 2)
        assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5
    print("check ok")


def bench(f, threads, reps):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    print(f"{'T':>4} {'K':>6} {'O':>6} {'pat':>6} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7}")
    for (k, o) in [(4096, 11008), (11008, 4096), (576, 1536), (1536, 576)]:
        b = rng.standard_normal((k, o)).astype(np.float32)
        for t in (1, 4, 16, 512):
            g = helper.make_graph([helper.make_node("MatMul", ["X", "B"], ["Y"])], "g",
                                  [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [t, o])],
                                  [onnx.numpy_helper.from_array(b, "B")])
            model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            xs = [rng.standard_normal((t, k)).astype(np.float32) for _ in range(4)]
            r = reps if t < 512 else max(5, reps // 6)
            for (n, m) in [(2, 4), (8, 16), (16, 32)]:
                idxs = [nm_indices(x, n, m) for x in xs]
                td, ts = [], []
                for i in range(r + 2):
                    x, idx = xs[i % 4], idxs[i % 4]
                    s = time.perf_counter()
                    sess.run(None, {"X": x})
                    td.append(time.perf_counter() - s)
                    s = time.perf_counter()
                    call(f, x, idx, b, threads)
                    ts.append(time.perf_counter() - s)
                d, sp = np.median(td[2:]) * 1e3, np.median(ts[2:]) * 1e3
                print(f"{t:>4} {k:>6} {o:>6} {n:>2}:{m:<3} {d:9.3f} {sp:9.3f} {d / sp:7.2f}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["check", "bench"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--build-dir", type=Path, default=None, help="where to build the harness library")
    a = ap.parse_args()
    fn = load(a.build_dir)
    check(fn) if a.what == "check" else bench(fn, a.threads, a.reps)
