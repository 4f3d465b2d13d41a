"""`nm-onnx evaluate-torch`: perplexity of the PyTorch simulation of a recipe (the ONNX path's twin).

Same windows and tokenization as the ONNX evaluation: non-overlapping --seqlen windows of the
evaluation text (WikiText-2 raw test by default), the first --limit of them. `--recipe dense` is the
unpruned baseline; `--weight-pruning magnitude|wanda` prunes the *weights* with the recipe's pattern
and targets instead of the activations (the paper's baseline at equal sparsity).
"""

from __future__ import annotations

import json
import sys
import time

from nm_onnx.commands._args import at_least, positive

NAME = "evaluate-torch"
HELP = "Perplexity of the PyTorch simulation of a recipe (dense, activation or weight pruning)."


def add_arguments(p):
    from nm_onnx.data import BOS_CHOICES

    p.add_argument("model", help="model source: smollm2-135m, a HF directory or a .gguf file")
    p.add_argument("--recipe", default=None, help="preset, recipe JSON, or 'dense' (default: the artifact's)")
    p.add_argument("--calibration", default=None, help="calibration artifact directory")
    p.add_argument("--data", default="wikitext2", help="wikitext2 (raw test split) or a text file")
    p.add_argument("--seqlen", type=at_least(2), default=512, help="tokens per window (default 512)")
    p.add_argument("--limit", type=positive, default=None, help="first N windows only (default: all)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="begin every window with the BOS token: auto (as the tokenizer does), always, never")
    p.add_argument("--weight-pruning", choices=("magnitude", "wanda"), default=None,
                   help="prune weights with the recipe's pattern instead of activations")
    p.add_argument("--samples", type=positive, default=128, help="Wanda calibration windows (default 128)")
    p.add_argument("--threads", type=positive, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


_SEMANTIC = ("pattern", "criterion", "shift", "scale_shift", "variance_correction", "targets", "exclude", "overrides")


def run(args) -> int:
    from nm_onnx.models import check_context, check_model_source, resolve_model

    check_model_source(args.model)  # before torch is imported
    from nm_onnx.calibration.artifact import load_artifact
    from nm_onnx.data import (
        bos_id,
        calibration_windows,
        eval_windows,
        load_calibration_text,
        load_eval_text,
        tokenize,
    )
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.recipe import SparsityRecipe

    artifact = load_artifact(args.calibration) if args.calibration else None
    if args.recipe is None and artifact is None:
        raise NmOnnxError("give --recipe (a preset, a recipe file or 'dense') or --calibration DIR")
    dense = args.recipe == "dense"
    recipe = None
    if not dense:
        recipe = SparsityRecipe.load(args.recipe) if args.recipe else artifact.recipe
        if artifact is not None:
            a, b = artifact.recipe.to_dict(), recipe.to_dict()
            diff = [k for k in _SEMANTIC if a.get(k) != b.get(k)]
            if diff:
                raise NmOnnxError(
                    f"--recipe {recipe.name} differs from the artifact's recipe {artifact.recipe.name} in "
                    f"{', '.join(diff)}; omit --recipe to use the artifact's"
                )
    if dense and args.weight_pruning:
        raise NmOnnxError("--weight-pruning needs a recipe with a pattern, not 'dense'")
    if args.weight_pruning and recipe.overrides:
        raise NmOnnxError(f"--weight-pruning takes one pattern; recipe '{recipe.name}' has per-site overrides")

    text = load_eval_text(args.data)
    hf_dir = resolve_model(args.model)
    check_context(hf_dir, args.seqlen, "--seqlen")

    import torch

    from nm_onnx.models import load_hf_model
    from nm_onnx.reference import apply_weight_pruning, nll_torch, sparsify_model

    torch.set_num_threads(max(1, args.threads))
    model, tok = load_hf_model(hf_dir)
    first = bos_id(tok, args.bos)
    windows = eval_windows(tokenize(tok, text.text), args.seqlen, args.limit, first)
    t0 = time.time()
    label = "dense"
    if args.weight_pruning:
        calib = None
        if args.weight_pruning == "wanda":
            ctext = load_calibration_text(recipe.calibration["data"])
            calib = calibration_windows(tokenize(tok, ctext.text), args.samples, args.seqlen,
                                        recipe.calibration["seed"], first)
        with torch.inference_mode():
            apply_weight_pruning(model, recipe.pattern, args.weight_pruning, calib, recipe.targets, recipe.exclude)
        label = f"weight-{args.weight_pruning} {recipe.pattern}"
    elif not dense:
        if (recipe.needs_fitting or recipe.shift == "static") and artifact is None:
            raise NmOnnxError(f"recipe '{recipe.name}' needs --calibration DIR (run `nm-onnx calibrate`)")
        sparsify_model(model, recipe, artifact)
        label = recipe.name
    res = nll_torch(model, windows, progress=not args.quiet and not args.json)
    out = {
        "model": str(args.model),
        "config": label,
        "recipe": None if recipe is None else recipe.to_dict(),
        "weight_pruning": args.weight_pruning,
        "calibration": args.calibration,
        "data": text.source,
        "seqlen": args.seqlen,
        "bos": first is not None,
        "windows": res.windows,
        "tokens": res.tokens,
        "nll": res.nll,  # mean NLL per predicted token (nats)
        "perplexity": res.perplexity,
        "seconds": round(time.time() - t0, 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{label}: perplexity {res.perplexity:.4f} on {res.windows} windows x {args.seqlen} tokens "
              f"({text.source})", file=sys.stdout)
    return 0
