"""`nm-onnx calibrate`: compute a recipe's constants on calibration text -> artifact directory."""

from __future__ import annotations

import json
import sys

NAME = "calibrate"
HELP = "Compute the constants a recipe needs (static/learned shifts, channel factors) -> artifact dir."


def add_arguments(p):
    p.add_argument("model", help="model source: smollm2-135m, a HF directory or a .gguf file")
    p.add_argument("--recipe", required=True, help="preset name or recipe JSON file")
    p.add_argument("--data", default=None, help="wikitext2 (default: the recipe's) or a text file")
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default 256)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="window sampling seed (default 0)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    from nm_onnx.calibration import calibrate
    from nm_onnx.data import calibration_windows, load_calibration_text, tokenize
    from nm_onnx.models import load_hf_model
    from nm_onnx.recipe import SparsityRecipe

    recipe = SparsityRecipe.load(args.recipe)
    for key in ("data", "samples", "seqlen", "seed"):
        v = getattr(args, key)
        if v is not None:
            recipe.calibration[key] = v
    recipe.validate()
    torch.set_num_threads(max(1, args.threads))
    cal = recipe.calibration
    text = load_calibration_text(cal["data"])
    model, tok = load_hf_model(args.model)
    windows = calibration_windows(tokenize(tok, text.text), cal["samples"], cal["seqlen"], cal["seed"])
    print(f"nm-onnx calibrate: {recipe.name} on {len(windows)} x {cal['seqlen']} tokens of {text.source}",
          file=sys.stderr)
    art = calibrate(model, recipe, windows, args.out, data_source=text.source, model_source=str(args.model),
                    progress=not args.quiet)
    print(json.dumps({"out": str(args.out), "constants": len(art.tensors), "digest": art.digest(),
                      "seconds": art.report["seconds"]}))
    return 0
