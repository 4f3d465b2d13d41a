"""`nm-onnx calibrate`: compute a recipe's constants on calibration text -> artifact directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nm_onnx.commands._args import add_overwrite, at_least, non_negative, positive

NAME = "calibrate"
HELP = "Compute the constants a recipe needs (static/learned shifts, channel factors) -> artifact dir."


def add_arguments(p):
    from nm_onnx.data import BOS_CHOICES

    p.add_argument("model", help="model source: smollm2-135m, a HF directory or a .gguf file")
    p.add_argument("--recipe", required=True, help="preset name or recipe JSON file")
    p.add_argument("--data", default=None, help="wikitext2 (default: the recipe's) or a text file")
    p.add_argument("--samples", type=positive, default=None, help="calibration windows (default 256)")
    p.add_argument("--seqlen", type=at_least(2), default=None, help="tokens per window (default 512)")
    p.add_argument("--seed", type=non_negative, default=None, help="window sampling seed (default 0)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="begin every window with the BOS token: auto (as the tokenizer does), always, never")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--threads", type=positive, default=2, help="torch threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(p)


def run(args) -> int:
    from nm_onnx.data import load_calibration_text
    from nm_onnx.io import check_output_dir
    from nm_onnx.models import check_context, check_model_source, resolve_model
    from nm_onnx.recipe import SparsityRecipe

    check_model_source(args.model)
    recipe = SparsityRecipe.load(args.recipe)
    for key in ("data", "samples", "seqlen", "seed"):
        v = getattr(args, key)
        if v is not None:
            recipe.calibration[key] = v
    recipe.validate()
    cal = recipe.calibration
    given = [x for x in (args.model, args.recipe, cal["data"]) if Path(str(x)).exists()]
    check_output_dir(args.out, "calibration", given, args.overwrite, option="--out")
    hf_dir = resolve_model(args.model)
    check_output_dir(args.out, "calibration", [*given, hf_dir], args.overwrite, option="--out")
    text = load_calibration_text(cal["data"], option="--data")
    check_context(hf_dir, cal["seqlen"], "--seqlen")

    import torch

    from nm_onnx.calibration import calibrate
    from nm_onnx.data import bos_id, calibration_windows, tokenize
    from nm_onnx.models import load_hf_model

    torch.set_num_threads(max(1, args.threads))
    model, tok = load_hf_model(hf_dir)
    first = bos_id(tok, args.bos)
    windows = calibration_windows(tokenize(tok, text.text), cal["samples"], cal["seqlen"], cal["seed"], first)
    print(f"nm-onnx calibrate: {recipe.name} on {len(windows)} x {cal['seqlen']} tokens of {text.source}",
          file=sys.stderr)
    art = calibrate(model, recipe, windows, args.out, data_source=text.source, model_source=str(args.model),
                    progress=not args.quiet, overwrite=args.overwrite, input_paths=[*given, hf_dir], bos=first)
    print(json.dumps({"out": str(args.out), "constants": len(art.tensors), "digest": art.digest(),
                      "seconds": art.report["seconds"]}))
    return 0
