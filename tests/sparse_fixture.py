"""A minimal stand-in for the graph transform, for tests of evaluation and validation only.

Rewrites every q/k/v/o/gate/up/down MatMul of a dense optimum export into one fused
`nm_onnx.NMSparseMatMul` (per-token median shift and/or variance correction), keeping the MatMul's
output name, so validate/bench tests can run whether or not the real transform is importable. The
real pipeline is nm_onnx.transform; when it exists the tests prefer it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nm_onnx.graph import find_linear_sites, load_model

TARGET_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def hand_transform(dense_dir, out_path, n=8, m=16, shift="median", variance_correction=1) -> Path:
    dense_dir = Path(dense_dir)
    sites = [s for s in find_linear_sites(load_model(dense_dir)) if s.kind in TARGET_KINDS and not s.via]
    model = onnx.load(str(dense_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {s.matmul: s for s in sites}
    nodes = []
    for node in model.graph.node:
        s = by_name.get(node.name)
        if s is None:
            nodes.append(node)
            continue
        prefix = s.matmul.rsplit("/", 1)[0]
        inputs = [s.input, s.weight, ""]
        if shift != "none":
            b = numpy_helper.to_array(inits[s.weight]).astype(np.float64)
            sb = numpy_helper.from_array(b.sum(0).astype(np.float32), f"{prefix}/shift_bias")
            model.graph.initializer.append(sb)
            inputs.append(sb.name)
        nodes.append(helper.make_node(
            "NMSparseMatMul", inputs, [s.output], name=f"{prefix}/NMSparseMatMul", domain="nm_onnx",
            n=n, m=m, shift=shift, variance_correction=variance_correction))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid("nm_onnx", 1))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path
