"""Decode time saved per site, measured: one linear at T = 1, our NMSparseMatMul vs ORT's dense MatMul.

For every (K, O, pattern) shape of the model the same ORT session options as a decode step (CPU,
`threads` intra-op threads, sequential) run a single-node graph: `MatMul(X[1, K], B[K, O])` and
`NMSparseMatMul` with the pattern and the base recipe's shift / variance correction (the fused op
that `transform` emits). Calls are interleaved (dense, then each pattern, per round) and rotate over
enough random weight copies that their bytes exceed the last-level cache (a decode step streams every
weight from memory, so a weight that stays in cache would flatter both sides); times are medians.
`saved_ms = dense_ms - sparse_ms` (negative when the op is slower). Results are cached per shape key
in a JSON file, so a rerun measures only the shapes it lacks. Numbers are for this machine.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from nm_onnx.recipe import DENSE, parse_pattern

CACHE_BYTES = 64 << 20  # weight bytes per variant across copies (> the L3 of the machines we use)
MAX_COPIES = 32


def shape_key(k: int, o: int, pattern: str, shift: str, variance_correction: bool, threads) -> str:
    return f"{k}x{o} {pattern} shift={shift} vc={int(variance_correction)} threads={threads or 'ort'}"


def _model(k: int, o: int, b: np.ndarray, pattern: str | None, shift: str, vc: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    from nm_onnx.ops.graphs import IR_VERSION
    from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION

    inits = [numpy_helper.from_array(b, "B")]
    if pattern is None:
        node = helper.make_node("MatMul", ["X", "B"], ["Y"])
    else:
        n, m, _ = parse_pattern(pattern)
        inputs = ["X", "B"]
        if shift != "none":
            inits.append(numpy_helper.from_array(b.sum(axis=0).astype(np.float32), "shift_bias"))
            inputs += ["", "shift_bias"]
        node = helper.make_node("NMSparseMatMul", inputs, ["Y"], domain=DOMAIN, n=n, m=m, shift=shift,
                                variance_correction=int(vc))
    graph = helper.make_graph([node], "site", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, o])], inits)
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(DOMAIN, OPSET_VERSION)] if pattern else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION).SerializeToString()


def _session(model: bytes, threads, sparse: bool):
    import onnxruntime as ort

    from nm_onnx import ops

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if sparse:
        ops.register_library(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def measure_shape(k: int, o: int, patterns: list[str], shift: str = "none", variance_correction: bool = False,
                  threads=None, repeats: int = 200, seed: int = 0) -> dict[str, dict]:
    """{pattern: {dense_ms, sparse_ms, saved_ms, repeats}} for one K x O, interleaved medians."""
    rng = np.random.default_rng(seed)
    copies = max(1, min(MAX_COPIES, -(-CACHE_BYTES // (k * o * 4))))
    weights = [(rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32) for _ in range(copies)]
    xs = [rng.standard_normal((1, k)).astype(np.float32) for _ in range(4)]
    variants = {DENSE: [_session(_model(k, o, b, None, shift, False), threads, False) for b in weights]}
    for p in patterns:
        variants[p] = [_session(_model(k, o, b, p, shift, variance_correction), threads, True) for b in weights]
    times: dict[str, list[float]] = {v: [] for v in variants}
    warmup = max(2, copies)
    for i in range(warmup + repeats):
        feed = {"X": xs[i % len(xs)]}
        for v, sessions in variants.items():
            s = sessions[i % copies]
            t0 = time.perf_counter()
            s.run(None, feed)
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    dense = statistics.median(times[DENSE]) * 1e3
    return {p: {"dense_ms": dense, "sparse_ms": statistics.median(times[p]) * 1e3,
                "saved_ms": dense - statistics.median(times[p]) * 1e3, "repeats": repeats} for p in patterns}


class SpeedTable:
    """Measured per-shape timings, cached in a JSON file (`path`, or in memory when None)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.rows = json.loads(self.path.read_text())
            except ValueError:
                self.rows = {}

    def _save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rows, indent=1))
            tmp.replace(self.path)

    def ensure(self, shapes, patterns, shift="none", variance_correction=False, threads=None, repeats=200,
               log=None) -> None:
        """Measure every (K, O) in `shapes` for the patterns not yet cached."""
        for k, o in sorted(set(shapes)):
            todo = [p for p in patterns if p != DENSE
                    and shape_key(k, o, p, shift, variance_correction, threads) not in self.rows]
            if not todo:
                continue
            if log:
                log(f"speed: timing {k}x{o} at T=1 ({', '.join(todo)} vs dense MatMul, {repeats} interleaved calls)")
            for p, r in measure_shape(k, o, todo, shift, variance_correction, threads, repeats).items():
                self.rows[shape_key(k, o, p, shift, variance_correction, threads)] = {"k": k, "o": o, "pattern": p, **r}
            self._save()

    def get(self, k, o, pattern, shift="none", variance_correction=False, threads=None) -> dict:
        if pattern == DENSE:
            return {"k": k, "o": o, "pattern": DENSE, "saved_ms": 0.0}
        return self.rows[shape_key(k, o, pattern, shift, variance_correction, threads)]
