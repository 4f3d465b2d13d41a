"""Perplexity grid of the PyTorch simulation on SmolLM2 (the table in docs/results.md).

Runs every configuration of the paper's comparison in ONE process (the model is loaded once; each
config wraps or prunes it and is undone before the next): dense; magnitude 2:4, 4:8, 8:16, 16:32;
2:4 and 8:16 with median shift and with variance correction; 2:4 and 8:16 weight pruning (magnitude
and Wanda) at the same 50% sparsity. Same windows for every row: the first --limit non-overlapping
--seqlen windows of WikiText-2 raw test, exactly what `nm-onnx evaluate-torch --limit N` scores.

    .venv/bin/python benchmarks/method_grid.py --limit 40 --json-out grid.json

Each row equals `nm-onnx evaluate-torch smollm2-135m --recipe R --limit N` (weight rows add
`--weight-pruning magnitude|wanda --samples S`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ACTIVATION = ["2:4-magnitude", "4:8-magnitude", "8:16-magnitude", "16:32-magnitude",
              "2:4-median-shift", "8:16-median-shift", "2:4-variance", "8:16-variance"]
WEIGHT = [("8:16", "magnitude"), ("2:4", "magnitude"), ("8:16", "wanda"), ("2:4", "wanda")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=40, help="first N evaluation windows")
    ap.add_argument("--samples", type=int, default=32, help="Wanda calibration windows (train/valid split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="run only these row labels")
    ap.add_argument("--json-out", default=None, help="write the rows as JSON here")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the markdown table of a saved grid and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return 0

    import torch

    from nm_onnx.data import (
        calibration_windows,
        eval_windows,
        load_calibration_text,
        load_eval_text,
        tokenize,
    )
    from nm_onnx.models import load_hf_model
    from nm_onnx.recipe import SparsityRecipe
    from nm_onnx.reference import apply_weight_pruning, nll_torch, sparsify_model, unsparsify_model

    torch.set_num_threads(args.threads)
    model, tok = load_hf_model(args.model)
    text = load_eval_text("wikitext2")
    all_windows = eval_windows(tokenize(tok, text.text), args.seqlen)
    windows = all_windows[: args.limit]
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = None
    rows = []

    def record(label, kind, fn):
        if args.only and label not in args.only:
            return
        t0 = time.time()
        fn()
        res = nll_torch(model, windows)
        row = {"config": label, "kind": kind, "perplexity": res.perplexity, "windows": res.windows,
               "tokens": res.tokens, "seconds": round(time.time() - t0, 1), "load": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        row["window_nll"] = list(getattr(res, "window_nll", []) or [])  # per-window mean NLL (paired checks)
        rows.append(row)

    record("dense", "dense", lambda: None)
    for name in ACTIVATION:
        record(name, "activation", lambda name=name: sparsify_model(model, name))
        unsparsify_model(model)
    for pattern, method in WEIGHT:
        label = f"weight-{method} {pattern}"

        def prune(pattern=pattern, method=method):
            nonlocal calib
            if method == "wanda" and calib is None:
                ctext = load_calibration_text("wikitext2")
                print(f"wanda calibration text: {ctext.source}", file=sys.stderr)
                recipe = SparsityRecipe.load(f"{pattern}-magnitude")
                calib = calibration_windows(tokenize(tok, ctext.text), args.samples, args.seqlen,
                                            recipe.calibration["seed"])
            with torch.inference_mode():
                apply_weight_pruning(model, pattern, method, calib)

        record(label, "weight", prune)
        model.load_state_dict(original)

    meta = {"model": args.model, "data": text.source, "seqlen": args.seqlen, "limit": args.limit,
            "windows_in_split": len(all_windows), "wanda_samples": args.samples,
            "threads": args.threads, "rows": rows}
    if args.json_out:
        from nm_onnx.io import atomic_file

        with atomic_file(args.json_out) as f:
            f.write(json.dumps(meta, indent=1) + "\n")
    print(markdown_table(meta))
    return 0


def markdown_table(meta: dict) -> str:
    """The results table: one row per config, perplexity and its ratio to dense."""
    dense = next((r["perplexity"] for r in meta["rows"] if r["config"] == "dense"), None)
    lines = ["| config | what is pruned | sparsity | perplexity | x dense |", "|---|---|---|---|---|"]
    for r in meta["rows"]:
        what = {"dense": "nothing", "activation": "activations (per token)", "weight": "weights"}[r["kind"]]
        sparsity = "0%" if r["kind"] == "dense" else "50%"
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        lines.append(f"| {r['config']} | {what} | {sparsity} | {r['perplexity']:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
