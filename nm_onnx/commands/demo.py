"""`nm-onnx demo`: the whole chain on the embedded default model, one comparison table.

Foundation version: fetch -> export -> inspect -> dense perplexity (ORT) next to the PyTorch number on
the same windows. Later stages (calibrate, transform, sparse evaluation, latency) extend this table.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from nm_onnx.models import DEFAULT_MODEL

NAME = "demo"
HELP = "Run the whole chain on the embedded default model and print one comparison table."


def add_arguments(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model source (default {DEFAULT_MODEL})")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--limit", type=int, default=16, help="perplexity windows (default 16; 0 = all)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data", default="wikitext2")


def _step(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from nm_onnx.data import eval_windows, load_eval_text, tokenize
    from nm_onnx.evaluation.perplexity import perplexity_onnx, perplexity_torch
    from nm_onnx.export import export
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.io import atomic_file
    from nm_onnx.models import load_hf_model
    from nm_onnx.runtime import make_session

    out = Path(args.out)
    t0 = time.time()
    _step(f"model {args.model}: fetch + load (PyTorch)")
    model, tok = load_hf_model(args.model)
    dense_dir = out / "dense"
    if not (dense_dir / "model.onnx").is_file():
        _step("export to ONNX (optimum, KV cache)")
        export(args.model, dense_dir)
    _step("inspect: linear sites")
    sites = find_linear_sites(load_model(dense_dir))
    counts = Counter(s.kind for s in sites)
    text = load_eval_text(args.data)
    ids = tokenize(tok, text.text)
    windows = eval_windows(ids, args.seqlen, args.limit or None)
    _step(f"perplexity on {windows.shape[0]} windows x {args.seqlen} tokens of {text.source}")
    sess = make_session(dense_dir)
    ppl_ort = perplexity_onnx(sess, windows)
    ppl_torch = perplexity_torch(model, windows)
    rows = [("dense (ONNX Runtime)", ppl_ort.perplexity), ("dense (PyTorch)", ppl_torch.perplexity)]
    table = [
        f"model: {args.model}; {len(sites)} linear sites ("
        + ", ".join(f"{k}={counts[k]}" for k in sorted(counts)) + ")",
        f"data: {text.source}; {windows.shape[0]} windows x {args.seqlen} tokens",
        "",
        "| config | perplexity |",
        "|---|---|",
        *[f"| {name} | {ppl:.3f} |" for name, ppl in rows],
        "",
        f"ORT vs PyTorch relative difference: {abs(ppl_ort.perplexity / ppl_torch.perplexity - 1):.2e}",
    ]
    report = "\n".join(table)
    print(report)
    with atomic_file(out / "report.md") as f:
        f.write("# nm-onnx demo\n\n" + report + "\n")
    with atomic_file(out / "report.json") as f:
        json.dump({"ort": ppl_ort.to_dict(), "torch": ppl_torch.to_dict(), "sites": dict(counts)}, f, indent=2)
    _step(f"done in {time.time() - t0:.0f} s; report: {out / 'report.md'}")
    return 0
