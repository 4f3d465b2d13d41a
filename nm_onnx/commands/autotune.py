"""`nm-onnx autotune MODEL --budget 5% --out DIR`: the fastest mixed recipe within a perplexity budget."""

from __future__ import annotations

import json
from pathlib import Path

from nm_onnx.commands._args import add_overwrite, add_threads, at_least, non_negative, positive

NAME = "autotune"
HELP = ("Choose per-site N:M patterns (or dense) that maximise measured decode speed within a perplexity "
        "budget; verify end to end; write recipe.json + report.")


def add_arguments(p):
    from nm_onnx.autotune.spec import DEFAULT_CANDIDATES
    from nm_onnx.data import BOS_CHOICES

    p.add_argument("model", help="model source: smollm2-135m, a HF directory or a .gguf file")
    p.add_argument("--budget", required=True, help="allowed perplexity increase over dense: 5%%, +5%% or 0.05")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help=f"patterns to choose from, comma separated (default {DEFAULT_CANDIDATES}; dense is always one)")
    p.add_argument("--base-recipe", default="8:16-magnitude",
                   help="criterion, mitigations, targets and excludes to keep (its pattern is ignored; "
                        "calibration-free recipes only; default 8:16-magnitude)")
    p.add_argument("--export", default=None,
                   help="the model's dense ONNX export directory (`nm-onnx export`); default: exported into the work dir")
    p.add_argument("--out", required=True, help="output directory: recipe.json, report.json/.md, frontier plot")
    p.add_argument("--work-dir", default=None,
                   help="cache of the sensitivity, speed and verification tables (kept; reuse it across budgets). "
                        "Default: .<out>.autotune-state beside --out, removed when the run succeeds")
    p.add_argument("--data", default="wikitext2", help="calibration text: wikitext2 (never its test split) or a file")
    p.add_argument("--samples", type=positive, default=8, help="calibration windows for the sensitivity (default 8)")
    p.add_argument("--seqlen", type=at_least(2), default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--seed", type=non_negative, default=0, help="calibration window and check-pair seed")
    p.add_argument("--check", type=non_negative, default=8,
                   help="(group, pattern) pairs whose loss increase is measured exactly to check the proxy (default 8)")
    p.add_argument("--eval-data", default="wikitext2", help="verification text: wikitext2 (raw test) or a file")
    p.add_argument("--limit", type=positive, default=8, help="evaluation windows for the verification (default 8)")
    p.add_argument("--eval-seqlen", type=at_least(2), default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--prompt", type=positive, default=128, help="bench prompt tokens (default 128)")
    p.add_argument("--decode", type=positive, default=32, help="bench decode steps (default 32)")
    p.add_argument("--repeats", type=positive, default=3, help="bench interleaved repeats (default 3)")
    p.add_argument("--speed-repeats", type=positive, default=200, help="calls per site-shape timing (default 200)")
    p.add_argument("--uniform", default="2:4,8:16,16:32",
                   help="uniform patterns verified for the frontier plot (comma list, or none)")
    p.add_argument("--max-rounds", type=positive, default=3, help="allocate-verify-tighten rounds (default 3)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto", help="BOS at the start of every window")
    p.add_argument("--torch-threads", type=positive, default=2, help="torch threads for the sensitivity (default 2)")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite(p)


def run(args) -> int:
    from nm_onnx.autotune.spec import parse_budget, parse_candidates
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.io import check_output_dir, check_work_dir, mark_work_dir
    from nm_onnx.models import check_model_source
    from nm_onnx.recipe import SparsityRecipe, parse_pattern

    budget = parse_budget(args.budget)
    candidates = parse_candidates(args.candidates)
    uniform = [] if args.uniform.strip().lower() in ("", "none") else [u.strip() for u in args.uniform.split(",") if u.strip()]
    for u in uniform:
        try:
            parse_pattern(u)
        except NmOnnxError as e:
            raise NmOnnxError(f"--uniform: {e}") from None
    from nm_onnx.autotune.run import check_base_recipe, export_sites

    base = SparsityRecipe.load(args.base_recipe)
    check_base_recipe(base)
    check_model_source(args.model)
    out = Path(args.out)
    given = [x for x in (args.model, args.base_recipe, args.export, args.data, args.eval_data)
             if x is not None and Path(str(x)).exists()]
    check_output_dir(out, "autotune", given, args.overwrite, option="--out")
    work = Path(args.work_dir) if args.work_dir else out.parent / f".{out.name}.autotune-state"
    check_work_dir(work, given + [out])
    export_dir = args.export
    if export_dir is not None:
        from nm_onnx.graph.load import model_file

        model_file(export_dir)  # a missing or corrupt export: one line now
        export_sites(export_dir, base, candidates + [u for u in uniform if u not in candidates])
    else:
        from nm_onnx.export import export

        mark_work_dir(work)  # before the first file lands in it, so a killed run can resume
        export_dir = work / "export"
        if not (export_dir / "model.onnx").is_file():
            export(args.model, export_dir)
        export_sites(export_dir, base, candidates + [u for u in uniform if u not in candidates])
    import torch

    from nm_onnx.autotune.run import autotune

    torch.set_num_threads(args.torch_threads)
    report = autotune(args.model, export_dir, out, budget, candidates, base, work, data=args.data,
                      samples=args.samples, seqlen=args.seqlen, seed=args.seed, check=args.check, bos=args.bos,
                      eval_data=args.eval_data, eval_limit=args.limit, eval_seqlen=args.eval_seqlen,
                      prompt=args.prompt, decode=args.decode, repeats=args.repeats, threads=args.threads,
                      speed_repeats=args.speed_repeats, uniform=uniform, max_rounds=args.max_rounds,
                      overwrite=args.overwrite, progress=not args.quiet, input_paths=given,
                      keep_work=bool(args.work_dir) or args.export is None)
    v = report["verified"]
    print(json.dumps({"out": str(out), "within_budget": report["within_budget"], "perplexity": v["perplexity"],
                      "dense_perplexity": report["dense"]["perplexity"],
                      "relative_perplexity": v["relative_perplexity"], "decode_speedup": v["decode_speedup"]}))
    if not report["within_budget"]:
        import sys

        print(f"nm-onnx autotune: no recipe verified within {budget} after {args.max_rounds} rounds; "
              f"{out}/recipe.json is the tightest one tried", file=sys.stderr)
        return 1
    return 0
