"""NMMask throughput on [512, 4096] float32 vs a memcpy of the same bytes and vs the standard-ONNX
decomposition (the `--portable` function body run by plain onnxruntime), measured in one run.

    python benchmarks/ops.py                 # print the Markdown table
    python benchmarks/ops.py --write         # also replace the "## NMMask (ops.py)" section of
                                             # benchmarks/RESULTS.md (other sections are kept)

GB/s counts the bytes of X (the same bytes the memcpy copies); ratio = memcpy time / NMMask time,
so 1.0 means "as fast as copying the activations". Medians over --repeats runs after warm-up; the
kernel runs through ORT with IOBinding (preallocated output, no Python copies). Never a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nm_onnx import ops
from nm_onnx.io import atomic_file
from nm_onnx.ops.graphs import op_model

PATTERNS = [(2, 4), (4, 8), (8, 16), (16, 32)]
TARGETS = {(2, 4): 0.8, (4, 8): None, (8, 16): 0.7, (16, 32): 0.5}
SECTION = "## NMMask (ops.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bound_session(model, x, y, threads: int, library: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if library:
        ops.register_library(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    io.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(x))
    io.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(y))
    return lambda: sess.run_with_iobinding(io)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(shape, threads_list, repeats, fn_repeats) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y = np.empty_like(x)
    gb = x.nbytes / 1e9
    rows = []
    for n, m in PATTERNS:
        for threads in threads_list:
            t_copy = median_time(lambda: np.copyto(y, x), repeats)
            kernel = bound_session(op_model("NMMask", ["X"], ["Y"], n=n, m=m), x, y, threads, True)
            t_kernel = median_time(kernel, repeats)
            t_copy2 = median_time(lambda: np.copyto(y, x), repeats)
            t_copy = min(t_copy, t_copy2)  # memcpy measured before and after, in the same run
            kernel()
            assert np.array_equal(y, ops.nm_mask(x, n, m)), "kernel output differs from the reference"
            fn_model = op_model("NMMask", ["X"], ["Y"], n=n, m=m, functions=True)
            t_fn = median_time(bound_session(fn_model, x, y, threads, False), fn_repeats, warmup=1)
            target = TARGETS[(n, m)]
            ratio = t_copy / t_kernel
            verdict = (
                "-"
                if target is None
                else ("met" if ratio >= target else f"missed ({ratio / target:.2f} of {target})")
            )
            rows.append(
                f"| {n}:{m} | {threads} | {t_kernel * 1e3:.3f} | {gb / t_kernel:.2f} | {t_copy * 1e3:.3f} | "
                f"{gb / t_copy:.2f} | {ratio:.3f} | {verdict} | {t_fn * 1e3:.1f} | {t_fn / t_kernel:.0f}x |"
            )
    head = [
        SECTION,
        "",
        (
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} cores, "
            f"onnxruntime {ort.__version__}, X = {list(shape)} float32 ({x.nbytes / 2**20:.0f} MiB); "
            f"medians of {repeats} runs (decomposition: {fn_repeats}); load average at start "
            f"{os.getloadavg()[0]:.1f}."
        ),
        "",
        (
            "| N:M | threads | NMMask ms | NMMask GB/s | memcpy ms | memcpy GB/s | ratio | target | "
            "decomposition ms | kernel speed-up |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n\n" + NOTES


NOTES = """\
Ratio = memcpy time / NMMask time (target: >= 0.8 at 2:4, >= 0.7 at 8:16, >= 0.5 at 16:32). Where a
target is missed, the `target` column says by how much (achieved ratio / target). Why: NMMask is
compute-bound here, not memory-bound. Every entry is ranked against the other M - 1 entries of its
group under the exact tie and NaN rules: order-preserving 32-bit keys, then on AVX-512 one lane
permute + two compares + mask/add per partner (M - 1 partners; groups of M <= 16 sit in one 16-lane
vector, M = 32 uses two-source permutes), i.e. about 6 (M - 1) / 16 vector operations per element on
top of the key transform and the masked copy (AVX2/baseline CPUs and other M use a transposed
pairwise ranking, slower). The reference memcpy moves 8 MiB that stay in the CPU caches (~35 GB/s,
not DRAM-bound). The work grows linearly with M, so the ratio falls from 2:4 to 16:32. This machine
has 2 cores shared with other jobs (load average above), which is why the 2-thread rows do not scale
(ORT's second worker waits for a busy core). Ways to close the gap: a threshold (n-th largest key)
search instead of full ranks for M >= 8, sorting networks, and fusing the mask into its consumer
(NMSparseMatMul already selects, gathers and multiplies in one op, so the standalone mask is only
used by the unfused graph form). The decomposition column is the same node run as its standard-ONNX
function body (no library): the portable fallback.
"""


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this script's section of RESULTS.md, keeping every other section."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with atomic_file(path) as f:
        f.write(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--fn-repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()
    ops.library_path()  # clear error when the library is not built
    text = run((args.rows, args.cols), sorted(set(args.threads)), args.repeats, args.fn_repeats)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
