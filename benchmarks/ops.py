"""NMMask throughput on [512, 4096] float32 vs a memcpy of the same bytes and vs the standard-ONNX
decomposition (the `--portable` function body run by plain onnxruntime), measured in one run.

    python benchmarks/ops.py                 # print the Markdown table
    python benchmarks/ops.py --write         # also replace the "## NMMask (ops.py)" section of
                                             # benchmarks/RESULTS.md (other sections are kept)

GB/s counts the bytes of X (the same bytes the memcpy copies); ratio = memcpy time / NMMask time,
so 1.0 means "as fast as copying the activations". The memcpy and the kernel are timed alternately
(one of each per repeat), so both see the same machine load; `ratio` is the median of the per-pair
ratios (robust to load bursts on a shared machine), `ratio (fastest runs)` = fastest memcpy / fastest
kernel; the ms columns are medians. The kernel runs through ORT with IOBinding (preallocated
output, no Python copies). Never a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
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


def paired_times(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Times of fn_a and fn_b run alternately (one each per repeat): both see the same machine load."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return ta, tb


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
    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    y = np.empty_like(x)
    gb = x.nbytes / 1e9
    rows = []
    for n, m in PATTERNS:
        for threads in threads_list:
            kernel = bound_session(op_model("NMMask", ["X"], ["Y"], n=n, m=m), x, y, threads, True)
            copies, kernels = paired_times(lambda: np.copyto(y, x), kernel, repeats)
            t_copy, t_kernel = float(np.median(copies)), float(np.median(kernels))
            ratio = float(np.median(np.array(copies) / np.array(kernels)))  # per pair: same load for both
            best = min(copies) / min(kernels)
            kernel()
            assert np.array_equal(y, ops.nm_mask(x, n, m)), "kernel output differs from the reference"
            fn_model = op_model("NMMask", ["X"], ["Y"], n=n, m=m, functions=True)
            t_fn = median_time(bound_session(fn_model, x, y, threads, False), fn_repeats, warmup=1)
            target = TARGETS[(n, m)]
            judged = min(ratio, best)  # conservative: met only when both estimates reach the target
            verdict = (
                "-"
                if target is None
                else (
                    "met"
                    if judged >= target
                    else f"missed ({math.floor(judged / target * 100) / 100:.2f} of {target})"
                )
            )
            rows.append(
                f"| {n}:{m} | {threads} | {t_kernel * 1e3:.3f} | {gb / t_kernel:.2f} | {t_copy * 1e3:.3f} | "
                f"{gb / t_copy:.2f} | {ratio:.3f} | {best:.3f} | {verdict} | {t_fn * 1e3:.1f} | "
                f"{t_fn / t_kernel:.0f}x |"
            )
    head = [
        SECTION,
        "",
        (
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} cores, "
            f"onnxruntime {ort.__version__}, X = {list(shape)} float32 ({x.nbytes / 2**20:.0f} MiB); "
            f"medians of {repeats} runs (decomposition: {fn_repeats}); load average (1 min) at "
            f"start {load0:.1f}, at end {os.getloadavg()[0]:.1f} (the machine is shared: see `uptime`)."
        ),
        "",
        (
            "| N:M | threads | NMMask ms | NMMask GB/s | memcpy ms | memcpy GB/s | ratio | ratio (fastest runs) | "
            "target | decomposition ms | kernel speed-up |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n\n" + NOTES


NOTES = """\
Ratio = memcpy time / NMMask time: median over alternating (memcpy, NMMask) pairs of the per-pair ratio
(target: >= 0.8 at 2:4, >= 0.7 at 8:16, >= 0.5 at 16:32; the issue's targets are read on the 1-thread
rows, against a single-threaded memcpy). The fastest-runs ratio is fastest memcpy / fastest kernel. The
`target` column is judged on the lower of the two ratios (conservative); where a target is missed it
says by how much (lower ratio / target).

What the kernels do (docs/ops.md, "Performance notes"): 2:4 runs an in-lane ranking (each 128-bit lane
holds one group; partners by in-lane shuffles, "beaten" = the sign bit of a key difference with the tie
bit, one vpternlog; ~4 cycles per 16 entries when the data sits in L2). M >= 8 runs the threshold select:
the keys of a block of 16 groups are transposed so that each lane holds one group, a Batcher network
pruned to the two outputs it needs gives each group's N-th and (N+1)-th largest key, entries >= the N-th
are kept and a tie at the threshold is ranked pairwise. Both prefetch the rows 4 KiB ahead. Masks are
bit-identical to the numpy reference (tie rule, NaN rule, -0 = +0; asserted by this script and the op
tests).

What bounds it (Zen 5, full-width AVX-512; quiet machine): the memcpy streams the 8 MiB in and out of
L3 at ~50-58 GB/s single-threaded, ~4.3 cycles per 16 entries. 2:4 computes in ~4 cycles per 16 entries
and lands at 0.78-0.82 of memcpy over repeated runs (its target, within run-to-run noise). The threshold
select is compute-bound: per 16 entries ~4 shuffles (transpose), 6.6 (8:16) / 9.8 (16:32) min/max (the
pruned networks have 53 / 157 comparators per 16 / 32 vectors), the key, compare and masked copy: ~7
cycles per 16 entries for 8:16 in L2, ~9 for 16:32 (`custom_ops/tests/micro_bench.sh`, which also
times memcpy in L2 at ~2.4), so 8:16 reaches ~0.55 and 16:32 ~0.45 of memcpy
(repeated runs: 0.53-0.57 and 0.43-0.47): missed by ~20% and ~10%. Reaching 0.7 at 8:16 needs the
network and transposes about half as costly (e.g. 16-bit keys, 32 groups per block, with an exact
fallback for ties in the truncated keys), not attempted yet. With two threads (what ORT uses by default
here) every pattern runs at 0.8-1.4x a single-threaded memcpy. Earlier rows of this table (2026-11-23)
were measured at load average 4-5, which slowed the memcpy 2-3x and made the ratios look better than
they are. AVX2 / baseline CPUs and M = 64 use the pairwise ranking (slower; not benchmarked here). The
decomposition column is the same node run as its standard-ONNX function body (no library): the
portable fallback.
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
