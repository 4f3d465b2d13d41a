"""Decode-speed benchmark: NMSparseMatMulNBits (our op library) vs ORT's com.microsoft MatMulNBits, same weights.

T = 1 token, float32 X, weight shapes (K x N) 4096x11008 and 11008x4096 (Llama-7B MLP), 1 and 2 intra-op
threads. Both sides use the SAME quantized weights: `nbits.quantize` (round to nearest, block 32 along K,
symmetric: no zero points) in MatMulNBits' layout, re-laid out by `MatMulNBitsWeight.to_kmajor()` for the
sparse op (8:16, the same values, scales and zero points). MatMulNBits runs with accuracy_level 4 (int8
activations, the fast path ORT ships for int4) and accuracy_level 0 (float activations). int4 and int8 (bits=8).

DRAM bound: every call takes the next of enough weight copies (each its own session with the weight as a
constant initializer) that the copies of one side hold more than 2x the last-level cache
(/sys/devices/system/cpu/cpu0/cache/index3/size). Calls of the sides alternate. Each cell is the median of
`--repeats` calls. "bound" is the bytes a side must read per call (packed weight + scales; the sparse side:
n/m of the packed rows and every scale row) / its median time, and "bound ratio" the ratio of those bytes
(what a perfectly memory-bound kernel pair would reach).

Writes its table into benchmarks/RESULTS.md, section "## NMSparseMatMulNBits decode (sparse_nbits.py)".
Usage: python benchmarks/sparse_nbits.py [--threads 1 2] [--repeats 40] [--bits 4 8] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nm_onnx import ops
from nm_onnx.io import atomic_file
from nm_onnx.ops import nbits
from nm_onnx.ops.graphs import IR_VERSION
from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## NMSparseMatMulNBits decode (sparse_nbits.py)"
SHAPES = [(4096, 11008), (11008, 4096)]
N, M = 8, 16
BLOCK = 32
N_INPUTS = 4
NOTES = """### What bounds it

- Both sides are bound by DRAM at T = 1 (weights rotate over > 2x L3). Bytes per call: MatMulNBits reads all
  packed weights plus the float32 scales (4 bytes per 32 weights: +25% at int4); the sparse op reads the kept
  half of the packed rows and, unavoidably, every scale row (each K block has kept rows). So the best ratio
  at 8:16, int4 block 32, is (0.5 + 0.125) / (0.25 + 0.125) = 1.67x, at int8 (1 + 0.125) / (0.5 + 0.125) = 1.8x;
  ratios above the bound mean MatMulNBits reaches less bandwidth than the sparse kernel (the GB/s columns).
- The sparse decode kernel (`custom_ops/cpu/sparse_gemm_nbits*`, docs/ops.md "Performance notes"): per K block
  and 128-column tile (AVX-512, int4: one cache line of each kept row) the block's kept rows accumulate
  x * (q - zp) in registers, then y += scale * acc once per block; full-width rows per task (split-K for two
  threads); the next block's rows are prefetched. Two half-width column chunks instead of full rows were
  1.1-1.2x slower; 256-column tiles for symmetric weights 10-25% slower.
- MatMulNBits accuracy_level 4 quantizes X to int8 per block and uses int8 dot products; accuracy_level 0 keeps
  float X (at int8 ORT 1.32 has no fast float path on this CPU: ~100x slower, shown for completeness). The
  sparse op's arithmetic is float32 (no activation quantization), the same numerics as the reference.
- Medians move by ~5-10% between runs on this shared 2-core machine; compare the sides of one row.
"""


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * unit
    except (OSError, ValueError):
        return 256 << 20


def _session(nodes, inits, k, o, threads, sparse) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, o])],
                              [numpy_helper.from_array(v, name) for name, v in inits.items()])
    imports = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    if sparse:
        imports.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
    model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Calls alternate between many sessions: a pool spinning after its call would hold the second core
    # during the next session's call (see sparse_matmul.py). Both sides pay the same wake-up.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if sparse:
        ops.register_library(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def dense_session(q: nbits.MatMulNBitsWeight, level: int, threads: int):
    inits = {"B": q.b, "scales": q.scales}
    names = ["X", "B", "scales"]
    if q.zero_points is not None:
        inits["zp"] = q.zero_points
        names.append("zp")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=q.k, N=q.n, bits=q.bits,
                            block_size=q.block_size, accuracy_level=level)
    return _session([node], inits, q.k, q.n, threads, False)


def sparse_session(w: nbits.KMajor, threads: int):
    inits = {"B": w.b, "scales": w.scales}
    names = ["X", "B", "scales"]
    if w.zero_points is not None:
        inits["zp"] = w.zero_points
        names.append("zp")
    node = helper.make_node("NMSparseMatMulNBits", names, ["Y"], domain=DOMAIN, n=N, m=M, bits=w.bits,
                            block_size=w.block_size)
    return _session([node], inits, w.k, w.o, threads, True)


def bytes_read(k: int, o: int, bits: int, sparse: bool) -> int:
    packed = k * o * bits // 8
    scales = -(-k // BLOCK) * o * 4
    return (packed * N // M if sparse else packed) + scales


def bench_cell(k, o, bits, threads, repeats, rng):
    per_copy = bytes_read(k, o, bits, False)
    copies = max(1, -(-2 * l3_bytes() // per_copy) + 1)
    base = (rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32)
    sides = {"MatMulNBits acc4": [], "MatMulNBits acc0": [], f"NMSparseMatMulNBits {N}:{M}": []}
    for c in range(copies):
        w = base + np.float32(1e-3 * c)  # distinct copies (identical ones could share pages)
        q = nbits.quantize(w, bits, BLOCK, symmetric=True)
        sides["MatMulNBits acc4"].append(dense_session(q, 4, threads))
        sides["MatMulNBits acc0"].append(dense_session(q, 0, threads))
        sides[f"NMSparseMatMulNBits {N}:{M}"].append(sparse_session(q.to_kmajor(), threads))
    xs = [rng.standard_normal((1, k)).astype(np.float32) for _ in range(N_INPUTS)]
    times = {key: [] for key in sides}
    warmup = copies  # touch every session once
    for i in range(repeats + warmup):
        feed = {"X": xs[i % N_INPUTS]}
        for key, sessions in sides.items():
            start = time.perf_counter()
            sessions[i % copies].run(None, feed)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    med = {key: float(np.median(v)) for key, v in times.items()}
    sp = med[f"NMSparseMatMulNBits {N}:{M}"]
    dense_b, sparse_b = bytes_read(k, o, bits, False), bytes_read(k, o, bits, True)
    return {
        "threads": threads, "K": k, "O": o, "bits": bits, "copies": copies, "repeats": repeats,
        "acc4_ms": med["MatMulNBits acc4"] * 1e3, "acc0_ms": med["MatMulNBits acc0"] * 1e3, "sparse_ms": sp * 1e3,
        "ratio4": med["MatMulNBits acc4"] / sp, "ratio0": med["MatMulNBits acc0"] / sp,
        "acc4_gbs": dense_b / med["MatMulNBits acc4"] / 1e9, "acc0_gbs": dense_b / med["MatMulNBits acc0"] / 1e9,
        "sparse_gbs": sparse_b / sp / 1e9, "bound_ratio": dense_b / sparse_b,
    }


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
    isa = os.environ.get("NM_ONNX_SPARSE_GEMM_ISA") or "best available"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, L3 {l3_bytes() >> 20} MiB, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}, sparse GEMM ISA: {isa}")


def table(rows) -> str:
    lines = [("| threads | bits | K x N | MatMulNBits acc4 ms | MatMulNBits acc0 ms | NMSparseMatMulNBits 8:16 ms "
              "| ratio vs acc4 | ratio vs acc0 | GB/s acc4 / acc0 / sparse | bound ratio | copies | repeats |"),
             "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['bits']} | {r['K']}x{r['O']} | {r['acc4_ms']:.3f} | {r['acc0_ms']:.3f} | "
                     f"{r['sparse_ms']:.3f} | {r['ratio4']:.2f} | {r['ratio0']:.2f} | {r['acc4_gbs']:.1f} / "
                     f"{r['acc0_gbs']:.1f} / {r['sparse_gbs']:.1f} | {r['bound_ratio']:.2f} | {r['copies']} | "
                     f"{r['repeats']} |")
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
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--shapes", nargs="+", default=[f"{k}x{o}" for k, o in SHAPES])
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    ops.library_path()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rng = np.random.default_rng(0)
    rows = []
    started, load_start = time.time(), os.getloadavg()[0]
    for bits in args.bits:
        for threads in args.threads:
            for k, o in shapes:
                r = bench_cell(k, o, bits, threads, args.repeats, rng)
                rows.append(r)
                print(f"bits={bits} threads={threads} {k}x{o}: acc4 {r['acc4_ms']:.3f} ms, acc0 {r['acc0_ms']:.3f} ms, "
                      f"sparse {r['sparse_ms']:.3f} ms; ratio {r['ratio4']:.2f} / {r['ratio0']:.2f} "
                      f"(bound {r['bound_ratio']:.2f}); GB/s {r['acc4_gbs']:.1f} / {r['acc0_gbs']:.1f} / "
                      f"{r['sparse_gbs']:.1f}", flush=True)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        SECTION, "",
        (f"Machine: {machine()}. Date: {when}. Run time {time.time() - started:.0f} s; load average "
         f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (`uptime`; 2 cores shared)."),
        (f"Command: `python benchmarks/sparse_nbits.py {' '.join(argv) if argv else ''}`. T = 1, float32 X; the same "
         f"RTN-quantized weights (block {BLOCK}, symmetric, float32 scales) on both sides, the sparse op's in the "
         "K-major layout (`to_kmajor`). Calls interleaved, each on the next weight copy (copies per side > 2x L3). "
         "Medians. Ratio > 1: NMSparseMatMulNBits is faster. GB/s: bytes the side must read per call (packed "
         "weight + scales; sparse: n/m of the packed rows + all scales) / median time. Bound ratio: dense bytes / "
         "sparse bytes, the ratio a purely memory-bound pair would reach."),
        "", table(rows), "",
    ])
    print("\n" + body)
    if not args.no_write:
        write_section(body + "\n" + NOTES)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
