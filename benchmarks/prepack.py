"""Prefill: ORT's MatMul on a pre-packed weight vs the same MatMul on an unpacked one vs NMSparseMatMul (not a test).

    python benchmarks/prepack.py [--shapes 576x1536 1536x576] [--tokens 16 128 512] [--threads 1 2] [--repeats 15]

Why it exists: the obvious way to make a long prompt as fast as the dense model is to mask X and hand it
to ORT's own dense MatMul (inside the op through the C API's CreateOp/InvokeOp, or with an `If` in the
graph). The dense model's MatMul, though, runs on a weight that ORT packed for MLAS once, when the session
was created (the weight is a constant initializer); a MatMul invoked from a custom op, or one whose weight
arrives as an input, packs it again on every call. This script measures that gap on the same inputs,
interleaved in one process: `MatMul` with B an initializer (the baseline a dense model ships), `MatMul`
with B fed as an input (what an invoked MatMul gets), and `NMSparseMatMul` 8:16 (our prefill GEMM).
Medians of the repeats; ratios are the dense-initializer time over each side's (> 1: faster than the
dense model). Results go to benchmarks/RESULTS.md by hand ("Prefill: pre-packed weights").
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nm_onnx import ops
from nm_onnx.ops.graphs import IR_VERSION
from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION


def _session(k: int, o: int, b: np.ndarray, threads: int, kind: str) -> ort.InferenceSession:
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])]
    inits = [numpy_helper.from_array(b, "B")]
    if kind == "input":
        inputs.append(helper.make_tensor_value_info("B", TensorProto.FLOAT, [k, o]))
        inits = []
    if kind == "sparse":
        node = helper.make_node("NMSparseMatMul", ["X", "B"], ["Y"], domain=DOMAIN, n=8, m=16)
    else:
        node = helper.make_node("MatMul", ["X", "B"], ["Y"])
    graph = helper.make_graph([node], "prepack", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, o])],
                              inits)
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(DOMAIN, OPSET_VERSION)] if kind == "sparse" else [])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # calls alternate between sessions
    if kind == "sparse":
        ops.register_library(so)
    model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    ops.library_path()  # a missing library is a clear error before any timing
    rng = np.random.default_rng(0)
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    print("| threads | K x O | T | MatMul, B pre-packed ms | MatMul, B as input ms | NMSparseMatMul 8:16 ms "
          "| unpacked / pre-packed speed | sparse / pre-packed speed |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for shape in args.shapes:
            k, o = (int(v) for v in shape.split("x"))
            b = (rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32)
            sessions = {kind: _session(k, o, b, threads, kind) for kind in ("initializer", "input", "sparse")}
            for t in args.tokens:
                x = rng.standard_normal((t, k)).astype(np.float32)
                feeds = {"initializer": {"X": x}, "input": {"X": x, "B": b}, "sparse": {"X": x}}
                times = {kind: [] for kind in sessions}
                for i in range(args.repeats + 2):
                    for kind, sess in sessions.items():
                        start = time.perf_counter()
                        sess.run(None, feeds[kind])
                        if i >= 2:
                            times[kind].append(time.perf_counter() - start)
                med = {kind: float(np.median(v)) * 1e3 for kind, v in times.items()}
                print(f"| {threads} | {k}x{o} | {t} | {med['initializer']:.3f} | {med['input']:.3f} | {med['sparse']:.3f} "
                      f"| {med['initializer'] / med['input']:.2f}x | {med['initializer'] / med['sparse']:.2f}x |",
                      flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
