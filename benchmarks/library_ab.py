"""NMMask time of two builds of the op library, interleaved in one process (A/B of a kernel change).

Each library file is registered in its own ORT sessions; per repeat both run the same input once,
alternating, so both see the same machine load. Reported: medians of each side and the median of the
per-pair ratios A time / B time (> 1: B is faster). Never a test.

    git stash; make ops; cp custom_ops/build/libnm_onnx_ops.so /tmp/a.so; git stash pop; make ops
    python benchmarks/library_ab.py /tmp/a.so custom_ops/build/libnm_onnx_ops.so --shapes 128x576 128x1536
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnxruntime as ort
from ops import paired_times  # benchmarks/ops.py (the script's folder is first on sys.path)

from nm_onnx.ops.graphs import op_model


def session(library: str, n: int, m: int, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(library)
    model = op_model("NMMask", ["X"], ["Y"], n=n, m=m, criterion="magnitude")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="library file A (the baseline)")
    ap.add_argument("b", help="library file B")
    ap.add_argument("--shapes", nargs="+", default=["128x576", "128x1536", "512x4096"], help="T x K of X")
    ap.add_argument("--patterns", nargs="+", default=["2:4", "8:16", "16:32"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| threads | N:M | T x K | A ms | B ms | A / B |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        for pat in args.patterns:
            n, m = map(int, pat.split(":"))
            sa, sb = session(args.a, n, m, threads), session(args.b, n, m, threads)
            for shape in args.shapes:
                t, k = map(int, shape.split("x"))
                x = rng.standard_normal((t, k)).astype(np.float32)
                ya, yb = sa.run(None, {"X": x})[0], sb.run(None, {"X": x})[0]
                assert np.array_equal(ya, yb), f"{pat} {shape}: the two libraries disagree"
                feeds = {"X": x}
                ta, tb = paired_times(lambda s=sa, f=feeds: s.run(None, f), lambda s=sb, f=feeds: s.run(None, f),
                                      args.repeats)
                ratio = statistics.median(a / b for a, b in zip(ta, tb))
                print(f"| {threads} | {pat} | {shape} | {statistics.median(ta) * 1e3:.3f} | "
                      f"{statistics.median(tb) * 1e3:.3f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
