"""Benchmark (not a test): `transform` on a Llama-7B-shaped exported-style graph.

Builds, streaming into a temporary directory, an optimum-style graph with 32 decoder layers, hidden
4096, MLP 11008, vocab 32000 and random float16 weights as external data (about 13.5 GB; each weight
is written straight to the data file, never held whole in memory), then times
`transform(..., recipe=Amber + median shift 8:16 on every projection)` in a child process and reads
that child's peak RSS. The temporary directory (input and output, ~27 GB) is removed at the end.
Targets (issue 5): < 60 s and peak RSS < 2 GB on the 2-core development machine.

Usage: python benchmarks/transform_7b.py [--layers 32] [--dir /tmp] [--keep]
Prints a Markdown section for benchmarks/RESULTS.md ("## transform on a 7B-shaped graph").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
PROJ = [("self_attn", "q_proj", HIDDEN, HIDDEN), ("self_attn", "k_proj", HIDDEN, HIDDEN),
        ("self_attn", "v_proj", HIDDEN, HIDDEN), ("self_attn", "o_proj", HIDDEN, HIDDEN),
        ("mlp", "gate_proj", HIDDEN, MLP), ("mlp", "up_proj", HIDDEN, MLP), ("mlp", "down_proj", MLP, HIDDEN)]
POOL = 64 * 1024 * 1024  # random float16 values reused (at random offsets) to fill the weights fast


class WeightWriter:
    """Appends random float16 tensors to one external data file; returns their TensorProtos."""

    def __init__(self, path: Path, seed: int = 0):
        self.path, self.offset, self.count = path, 0, 0
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.rng = np.random.default_rng(seed)
        self.pool = (self.rng.standard_normal(POOL, dtype=np.float32) * 0.02).astype(np.float16)

    def add(self, shape: tuple[int, ...]) -> TensorProto:
        n = int(np.prod(shape))
        name = f"onnx::MatMul_{self.count}"  # anonymous, like optimum's
        self.count += 1
        done = 0
        while done < n:  # stream chunks from random places of the pool
            take = min(n - done, POOL // 2)
            start = int(self.rng.integers(0, POOL - take + 1))
            self.f.write(self.pool[start:start + take].tobytes())
            done += take
        t = helper.make_tensor_value_info(name, TensorProto.FLOAT16, shape)  # only for the shape
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(2 * n))):
            tensor.external_data.add(key=k, value=v)
        self.offset += 2 * n
        del t
        return tensor

    def close(self) -> None:
        self.f.close()


def build(out_dir: Path, layers: int) -> Path:
    """Write model.onnx + model.onnx_data (exported-style names) into out_dir; returns model.onnx."""
    w = WeightWriter(out_dir / "model.onnx_data")
    nodes, inits = [], []
    embed = w.add((VOCAB, HIDDEN))
    embed.name = "model.embed_tokens.weight"
    inits.append(embed)
    nodes.append(helper.make_node("Gather", [embed.name, "input_ids"], ["h0"], name="/model/embed_tokens/Gather"))
    h = "h0"
    for i in range(layers):
        p = f"/model/layers.{i}"
        outs = {}
        for block, proj, k, o in PROJ:
            t = w.add((k, o))
            inits.append(t)
            src = {"o_proj": f"{p}/attn_out", "down_proj": f"{p}/mlp/act"}.get(proj, h)
            name = f"{p}/{block}/{proj}/MatMul"
            nodes.append(helper.make_node("MatMul", [src, t.name], [f"{name}_output_0"], name=name))
            outs[proj] = f"{name}_output_0"
            if proj == "v_proj":  # stand-in for attention: q + k + v
                nodes.append(helper.make_node("Add", [outs["q_proj"], outs["k_proj"]], [f"{p}/qk"], name=f"{p}/self_attn/Add"))
                nodes.append(helper.make_node("Add", [f"{p}/qk", outs["v_proj"]], [f"{p}/attn_out"], name=f"{p}/self_attn/Add_1"))
            if proj == "o_proj":
                nodes.append(helper.make_node("Add", [h, outs["o_proj"]], [f"{p}/h1"], name=f"{p}/Add"))
                h = f"{p}/h1"
            if proj == "up_proj":
                nodes.append(helper.make_node("Sigmoid", [outs["gate_proj"]], [f"{p}/mlp/sig"], name=f"{p}/mlp/act_fn/Sigmoid"))
                nodes.append(helper.make_node("Mul", [outs["gate_proj"], f"{p}/mlp/sig"], [f"{p}/mlp/silu"], name=f"{p}/mlp/act_fn/Mul"))
                nodes.append(helper.make_node("Mul", [f"{p}/mlp/silu", outs["up_proj"]], [f"{p}/mlp/act"], name=f"{p}/mlp/Mul"))
        nodes.append(helper.make_node("Add", [h, outs["down_proj"]], [f"{p}/h2"], name=f"{p}/Add_1"))
        h = f"{p}/h2"
    head = w.add((HIDDEN, VOCAB))
    inits.append(head)
    nodes.append(helper.make_node("MatMul", [h, head.name], ["logits"], name="/lm_head/MatMul"))
    w.close()
    graph = helper.make_graph(
        nodes, "llama7b_shaped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", VOCAB])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = out_dir / "model.onnx"
    onnx.save(model, str(path))
    return path


CHILD = """
import json, sys, time
from nm_onnx.recipe import SparsityRecipe
from nm_onnx.transform import transform
r = SparsityRecipe(name="amber-median-8:16", pattern="8:16", criterion="amber", shift="median").validate()
t = time.perf_counter()
rep = transform(sys.argv[1], sys.argv[2], r)
c = rep.passes.counts()
print(json.dumps({"seconds": time.perf_counter() - t, "fused": sum(v["fused"] for v in c.values()),
                  "dense": sum(v["dense"] for v in c.values())}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the generated graphs")
    args = ap.parse_args()
    per_layer = sum(k * o for *_, k, o in PROJ)
    need = 2 * 2 * (args.layers * per_layer + 2 * VOCAB * HIDDEN)  # input + output, float16
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.1:
        print(f"needs {need * 1.1 / 1e9:.1f} GB free in {args.dir}, has {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="nm-onnx-7b-", dir=args.dir))
    try:
        t = time.perf_counter()
        src_dir = tmp / "dense"
        src_dir.mkdir()
        build(src_dir, args.layers)
        gen = time.perf_counter() - t
        size = (src_dir / "model.onnx_data").stat().st_size
        print(f"generated {size / 1e9:.2f} GB in {gen:.1f} s", flush=True)
        load_before = os.getloadavg()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src_dir), str(tmp / "sparse")],
                                stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            print(out, file=sys.stderr)
            return 1
        load_after = os.getloadavg()
        res = json.loads(out.strip().splitlines()[-1])
        rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux: KiB
        out_size = sum(f.stat().st_size for f in (tmp / "sparse").iterdir())
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cpu = platform.processor() or platform.machine()
        print(f"\n## transform on a 7B-shaped graph (transform_7b.py)\n\n"
              f"{when}, {cpu}, {os.cpu_count()} cores, load average (1/5/15 min) before the transform "
              f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)}. Graph: "
              f"{args.layers} layers, hidden {HIDDEN}, MLP {MLP}, vocab {VOCAB}, float16 external data "
              f"{size / 1e9:.2f} GB (generated in {gen:.0f} s). Recipe: Amber + median shift, 8:16, every "
              f"q/k/v/o/gate/up/down projection.\n\n"
              f"| sites fused | sites dense | transform s | peak RSS GB | output GB | target |\n|---|---|---|---|---|---|\n"
              f"| {res['fused']} | {res['dense']} | {res['seconds']:.1f} | {rss_gb:.2f} | {out_size / 1e9:.2f} | "
              f"< 60 s: {'met' if res['seconds'] < 60 else 'missed'}; < 2 GB: {'met' if rss_gb < 2 else 'missed'} |")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
