"""Decode-speed benchmark: NMSparseMatMul (our op library in ORT) vs ORT's dense MatMul, same process and run.

float32, T in {1, 4, 16, 512} tokens, B shapes 4096x11008 and 11008x4096 (Llama-7B MLP) and 576x1536,
1536x576 (SmolLM2), patterns 2:4, 8:16, 16:32, 1 and 2 intra-op threads. Each cell is the median of
`--repeats` (default 30) timed `session.run` calls; T=512 on the Llama shapes uses `--prefill-repeats`
(default 7: each call takes about a second). Dense and sparse calls alternate, and every call takes the
next of several input rows X and the next of several copies of the weight (enough copies that they
do not all fit in the last-level cache), so neither side is timed on warm caches the other did not get.
B is a constant initializer on both sides (ORT's MatMul may pre-pack it; that is the baseline it ships).

Writes the table (machine, date, medians, speedup = dense / sparse, and the weight bandwidth each side
reached) into benchmarks/RESULTS.md, section "## NMSparseMatMul decode (sparse_matmul.py)".
Usage: python benchmarks/sparse_matmul.py [--quick] [--threads 1 2] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nm_onnx import ops
from nm_onnx.io import atomic_file
from nm_onnx.ops.graphs import IR_VERSION
from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## NMSparseMatMul decode (sparse_matmul.py)"
SHAPES = [(4096, 11008), (11008, 4096), (576, 1536), (1536, 576)]
TOKENS = [1, 4, 16, 512]
PATTERNS = [(2, 4), (8, 16), (16, 32)]
N_INPUTS = 4
NOTES = """### How the kernel works, and what bounds it

- Decode (T <= 16): the op selects per token, then `custom_ops/cpu/sparse_gemm*` accumulates only
  the kept rows of B. Y is split into two (or more) wide column chunks (one per intra-op thread);
  each token's kept rows stream through its L1-resident piece of Y four rows at a time (AVX-512 or
  AVX2+FMA, chosen at run time; scalar fallback). Long contiguous row segments keep the hardware
  prefetchers busy: T=1 is bound by memory bandwidth on both sides, so the speedup is the ratio of
  bytes read (M/N = 2 at 50%) times the ratio of bandwidths reached (the two GB/s columns). The
  sparse side reads 1 KiB..44 KiB pieces of scattered rows, the dense side one contiguous stream.
- Several tokens (T = 4, 16): each token has its own kept rows, so together they touch nearly every
  row of B (1 - (1/2)^T of them at 50%): the bytes are those of the dense GEMM and the FMAs are
  halved, but each FMA needs its own load of B (no register reuse across tokens as in a dense GEMM).
  Expect about dense speed, not M/N.
- Prefill (T = 512): register tiles of 6 tokens x 64 columns (24 zmm accumulators); for each block of
  64 kept indices the B rows the task's tokens touch are packed into a contiguous per-thread buffer
  (B's rows are O floats apart, 16 KiB or 44 KiB: they alias in the L1 sets). Half the FMAs of a
  dense GEMM, but every FMA needs its own load of B (each token has its own kept rows, so a B vector
  is never shared across tokens as in a dense GEMM), plus a load of the index and of x per token and
  kept row. On this Zen 5 core (2 zmm FMAs and about 2 loads per cycle, measured with throwaway
  loops not kept in the repo) the inner loop alone reaches ~1.1 FMA/cycle and the GEMM ~0.8-0.9 (the
  T=512 rows below: FMAs / time / clock, the clock from `custom_ops/tests/micro_bench.sh`; MLAS's
  dense GEMM: ~1.8), which puts T = 512 at 0.8-0.95x of dense: around the 1.1x-time target, met on some shapes
  and missed on others (targets table above; 11008x4096 is the hard one). A register-resident x,
  paired index loads, wider tiles
  (3x8, 2x12), smaller blocks and software prefetch were tried: none gained more than run-to-run noise.
  Meeting 1.1x everywhere would take a path that shares B loads across tokens (e.g. mask + a dense
  GEMM), i.e. giving up the sparse FMA savings at prefill.
- Threads: 2-thread rows run with `session.intra_op.allow_spinning = 0`, because the benchmark
  alternates calls between many sessions (one per weight copy, up to 96 per side) and a spinning pool
  would hold the second core during the next session's call (with spinning, 2-thread T=512 dense
  MatMul was 4x slower than 1 thread). Both sides pay a thread wake-up per call, which weighs on the
  small shapes and makes single 2-thread cells there erratic; the issue's targets are 1-thread.
- The op's own selection (shift, N:M top-N per group, variance) runs before the GEMM; for the small
  SmolLM2 shapes it is a visible share of the time (the GEMM alone: `custom_ops/tests/harness.py bench`).
- Medians still move by 10-30 % between runs (2 cores; earlier runs of this table, before 2026-12-01,
  were taken at load average 9-14 and are not comparable); compare the two sides of one row (same run,
  interleaved calls), not rows of different runs.
"""
CACHE_BYTES = 256 << 20  # weight copies until their total passes this: the sparse side reads N/M of it,
# 128 MiB at 50%, 4x the 32 MiB last-level cache (with 64 MiB the kept rows of all copies fit in L3)


def _model(node: onnx.NodeProto, b: np.ndarray, t: int, sparse: bool) -> bytes:
    k, o = b.shape
    graph = helper.make_graph(
        [node], "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [t, o])],
        [numpy_helper.from_array(b, "B")],
    )
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(DOMAIN, OPSET_VERSION)] if sparse else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION).SerializeToString()


def _session(model: bytes, threads: int, sparse: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Calls alternate between many sessions (weight copies x patterns): a pool that spins after its call
    # would hold the second core while the next session runs (measured: 2-thread T=512 dense MatMul 4x
    # slower than 1 thread). Workers sleep instead; both sides pay the same wake-up.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if sparse:
        ops.register_library(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def bench_cell(k: int, o: int, t: int, threads: int, repeats: int, rng) -> list[dict]:
    """Dense MatMul and NMSparseMatMul (each pattern) on the same inputs; one row per pattern."""
    copies = max(1, min(96, -(-CACHE_BYTES // (k * o * 4))))
    weights = [(rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32) for _ in range(copies)]
    xs = [rng.standard_normal((t, k)).astype(np.float32) for _ in range(N_INPUTS)]
    dense = [_session(_model(helper.make_node("MatMul", ["X", "B"], ["Y"]), b, t, False), threads, False)
             for b in weights]
    sparse = {
        (n, m): [_session(_model(helper.make_node("NMSparseMatMul", ["X", "B"], ["Y"], domain=DOMAIN, n=n, m=m),
                                 b, t, True), threads, True) for b in weights]
        for n, m in PATTERNS
    }
    times = {"dense": [], **{p: [] for p in PATTERNS}}
    warmup = 2
    for i in range(repeats + warmup):
        feed = {"X": xs[i % N_INPUTS]}
        c = i % copies
        for key, sessions in [("dense", dense)] + [(p, sparse[p]) for p in PATTERNS]:
            start = time.perf_counter()
            sessions[c].run(None, feed)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[key].append(elapsed)
    d = float(np.median(times["dense"]))
    rows = []
    for n, m in PATTERNS:
        s = float(np.median(times[(n, m)]))
        rows.append({
            "T": t, "K": k, "O": o, "pattern": f"{n}:{m}", "threads": threads, "repeats": repeats,
            "dense_ms": d * 1e3, "sparse_ms": s * 1e3, "speedup": d / s,
            "dense_gbs": k * o * 4 / d / 1e9, "sparse_gbs": k * o * 4 * n / m / s / 1e9,
        })
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = os.environ.get("NM_ONNX_SPARSE_GEMM_ISA") or "best available (AVX-512 here if the CPU has it)"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}, sparse GEMM ISA: {isa}")


def targets(rows: list[dict]) -> str:
    """The issue's targets (1 thread, float32, Llama-7B MLP shapes), read from this run's rows."""
    cell = {(r["threads"], r["T"], r["K"], r["O"], r["pattern"]): r["speedup"] for r in rows}
    big = SHAPES[:2]
    if not all((1, t, k, o, "8:16") in cell for t in (1, 512) for k, o in big):
        return ""
    t1 = [cell[(1, 1, k, o, "8:16")] for k, o in big]
    t512 = [1 / cell[(1, 512, k, o, "8:16")] for k, o in big]

    def status(ok: bool) -> str:
        return "met" if ok else "missed"

    lines = ["Targets (issue: 1 thread, float32, Llama-7B MLP shapes), read from the table below:", "",
             f"| target | {big[0][0]}x{big[0][1]} | {big[1][0]}x{big[1][1]} | status |", "|---|---|---|---|",
             (f"| T=1, 8:16: >= 1.8x faster than ORT MatMul | {t1[0]:.2f}x | {t1[1]:.2f}x | "
              f"{status(min(t1) >= 1.8)} |"),
             (f"| T=512, 8:16: time <= 1.1x the dense time | {t512[0]:.2f}x | {t512[1]:.2f}x | "
              f"{status(max(t512) <= 1.1)} |")]
    for t, what in ((1, "speedup"), (512, "time vs dense")):
        vals = []
        for k, o in big:
            v = [cell.get((1, t, k, o, p)) for p in ("2:4", "16:32")]
            vals.append(" / ".join("-" if x is None else f"{(x if t == 1 else 1 / x):.2f}x" for x in v))
        lines.append(f"| T={t}, 2:4 / 16:32 {what} (reported) | {vals[0]} | {vals[1]} | - |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    head = ("| threads | T | K x O | pattern | dense MatMul ms | NMSparseMatMul ms | speedup (dense/sparse) "
            "| dense B GB/s | sparse kept-B GB/s | repeats |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['T']} | {r['K']}x{r['O']} | {r['pattern']} | {r['dense_ms']:.3f} | "
            f"{r['sparse_ms']:.3f} | {r['speedup']:.2f} | {r['dense_gbs']:.1f} | {r['sparse_gbs']:.1f} | "
            f"{r['repeats']} |"
        )
    return "\n".join(lines)


def write_section(body: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving every other section as is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + text[end:] if nxt >= 0 else "")
    with atomic_file(path) as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--prefill-repeats", type=int, default=7,
                    help="repeats for T=512 on the Llama shapes (each call takes about a second)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes, T in {1, 16}, 10 repeats (smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    ops.library_path()  # a missing library is a clear error before any timing

    shapes, tokens, repeats = SHAPES, TOKENS, args.repeats
    if args.quick:
        shapes, tokens, repeats = SHAPES[2:], [1, 16], 10
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    started = time.time()
    load_start = os.getloadavg()[0]
    for threads in args.threads:
        for k, o in shapes:
            for t in tokens:
                r = args.prefill_repeats if (t >= 512 and k * o > 10_000_000) else repeats
                for row in bench_cell(k, o, t, threads, r, rng):
                    rows.append(row)
                    print(f"threads={threads} T={t:<3} {k}x{o} {row['pattern']:>5}: dense {row['dense_ms']:9.3f} ms"
                          f"  sparse {row['sparse_ms']:9.3f} ms  speedup {row['speedup']:.2f}", flush=True)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        SECTION, "",
        (f"Machine: {machine()}. Date: {when}. Run time {time.time() - started:.0f} s; load average "
         f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores shared)."),
        ("Command: `python benchmarks/sparse_matmul.py`. Medians of the repeats shown (after 2 warm-up calls); "
         "inputs rotate over 4 X and over enough weight copies to exceed 256 MiB (the kept half: 4x the L3). Speedup > 1: NMSparseMatMul "
         "is faster. B GB/s: weight bytes read per call / median time (dense reads all of B, sparse the "
         "kept N/M of it)."),
        "", targets(rows), table(rows), "",
    ])
    print("\n" + body)
    if not args.no_write and not args.quick:
        write_section(body + "\n" + NOTES)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
