"""What `--prefill-dispatch` rests on, measured in ORT with the op library (interleaved, medians):

1. rows: one linear at K x O over T token rows: ORT's MatMul (weight pre-packed, what a dense model
   runs), NMSparseMatMul 8:16, NMMask + MatMul (the prefill form, the MatMul inside an If branch
   reading the weight from outer scope, so pre-packed or not shows) - where the sparse kernel stops
   winning decides the default ROWS.
2. if: the cost of an If per call: a chain of L small sites (K x K, one token) as plain NMSparseMatMul
   nodes, each wrapped in its own If, and all inside one If (what the pass builds).

    .venv/bin/python benchmarks/dispatch_cost.py rows --shapes 576x1536 1536x576 2048x8192 --threads 1
    .venv/bin/python benchmarks/dispatch_cost.py if --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nm_onnx import ops

OPSETS = [h.make_opsetid("", 18), h.make_opsetid("nm_onnx", 1)]
NM = {"domain": "nm_onnx", "n": 8, "m": 16}


def _model(nodes, inits, k, o):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("X", TP.FLOAT, ["T", k])],
                     [h.make_tensor_value_info("Y", TP.FLOAT, ["T", o])], inits)
    return h.make_model(g, opset_imports=OPSETS, ir_version=10)


def _branch(nodes, out):
    return h.make_graph(nodes, out, [], [h.make_tensor_value_info(out, TP.FLOAT, None)])


def _session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sessions alternate calls
    ops.register_library(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(sessions, x, repeats):
    t = {n: [] for n in sessions}
    for _ in range(repeats):
        for n, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"X": x})
            t[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in t.items()}


def rows(shapes, tokens, threads):
    rng = np.random.default_rng(0)
    print("| threads | K x O | T | MatMul ms | NMSparseMatMul ms | NMMask + MatMul in an If branch ms "
          "| sparse / dense speed | prefill form / dense speed |\n|---|---|---|---|---|---|---|---|")
    for t in threads:
        for shape in shapes:
            k, o = map(int, shape.split("x"))
            w = nh.from_array((rng.standard_normal((k, o)) * 0.05).astype(np.float32), "W")
            one = nh.from_array(np.array(0, dtype=np.int64), "zero")
            prefill = _branch([h.make_node("NMMask", ["X"], ["Xh"], criterion="magnitude", **NM),
                               h.make_node("MatMul", ["Xh", "W"], ["Yp"])], "Yp")
            decode = _branch([h.make_node("NMSparseMatMul", ["X", "W"], ["Yd"], **NM)], "Yd")
            s = {"dense": _session(_model([h.make_node("MatMul", ["X", "W"], ["Y"])], [w], k, o), t),
                 "sparse": _session(_model([h.make_node("NMSparseMatMul", ["X", "W"], ["Y"], **NM)], [w], k, o), t),
                 "prefill": _session(_model([h.make_node("Size", ["X"], ["n"]), h.make_node("Greater", ["n", "zero"], ["c"]),
                                             h.make_node("If", ["c"], ["Y"], then_branch=prefill, else_branch=decode)],
                                            [w, one], k, o), t)}
            for tok in tokens:
                x = rng.standard_normal((tok, k)).astype(np.float32)
                m = _time(s, x, 200 if tok == 1 else (40 if tok <= 128 else 15))
                print(f"| {t} | {shape} | {tok} | {m['dense']:.3f} | {m['sparse']:.3f} | {m['prefill']:.3f} | "
                      f"{m['dense'] / m['sparse']:.2f}x | {m['dense'] / m['prefill']:.2f}x |", flush=True)


def if_cost(threads, layers, k):
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal((k, k)) * 0.05).astype(np.float32), f"W{i}") for i in range(layers)]
    inits.append(nh.from_array(np.array(2 * k, dtype=np.int64), "limit"))
    cond = [h.make_node("Size", ["X"], ["n"]), h.make_node("Greater", ["n", "limit"], ["c"])]

    def chain(form, tag):
        nodes, x = [], "X"
        for i in range(layers):
            y = f"{tag}{i}"
            if form == "prefill":
                nodes += [h.make_node("NMMask", [x], [f"{y}h"], criterion="magnitude", **NM),
                          h.make_node("MatMul", [f"{y}h", f"W{i}"], [y])]
            else:
                nodes.append(h.make_node("NMSparseMatMul", [x, f"W{i}"], [y], **NM))
            x = y
        return nodes, x

    plain, last = chain("decode", "p")
    plain.append(h.make_node("Identity", [last], ["Y"]))
    per_site, x = [], "X"
    for i in range(layers):
        then = _branch([h.make_node("NMMask", [x], [f"t{i}h"], criterion="magnitude", **NM),
                        h.make_node("MatMul", [f"t{i}h", f"W{i}"], [f"t{i}"])], f"t{i}")
        other = _branch([h.make_node("NMSparseMatMul", [x, f"W{i}"], [f"e{i}"], **NM)], f"e{i}")
        y = "Y" if i == layers - 1 else f"s{i}"
        per_site.append(h.make_node("If", ["c"], [y], then_branch=then, else_branch=other))
        x = y
    tn, to = chain("prefill", "t")
    en, eo = chain("decode", "e")
    whole = [h.make_node("If", ["c"], ["Y"], then_branch=_branch(tn, to), else_branch=_branch(en, eo))]
    print("| threads | plain ms | one If per site ms | one If around all ms | per If per call us "
          "| the whole-graph If us |\n|---|---|---|---|---|---|")
    x1 = rng.standard_normal((1, k)).astype(np.float32)
    for t in threads:
        s = {"plain": _session(_model(plain, inits[:-1], k, k), t),
             "per_site": _session(_model(cond + per_site, inits, k, k), t),
             "whole": _session(_model(cond + whole, inits, k, k), t)}
        m = _time(s, x1, 300)
        print(f"| {t} | {m['plain']:.3f} | {m['per_site']:.3f} | {m['whole']:.3f} | "
              f"{(m['per_site'] - m['plain']) / layers * 1e3:.1f} | {(m['whole'] - m['plain']) * 1e3:.0f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("rows", "if"))
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "2048x8192"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 128, 512])
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--layers", type=int, default=100, help="sites in the If chain (what: if)")
    ap.add_argument("--k", type=int, default=576, help="K = O of the chain's sites (what: if)")
    args = ap.parse_args(argv)
    if args.what == "rows":
        rows(args.shapes, args.tokens, args.threads)
    else:
        if_cost(args.threads, args.layers, args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
