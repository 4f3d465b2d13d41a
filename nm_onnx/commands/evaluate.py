"""`nm-onnx evaluate MODEL`: perplexity and zero-shot accuracy of an ONNX model through ONNX Runtime.

Perplexity: non-overlapping windows (the paper's protocol). Zero-shot tasks: lm-eval-harness with the
`nm-onnx` model type over the same session, task data read offline (nm_onnx.evaluation.tasks).
Output: a Markdown table (default) or JSON (--json); --out DIR writes both (results.json, results.md).
"""

from __future__ import annotations

import json
import sys

NAME = "evaluate"
HELP = "Perplexity and zero-shot tasks (lm-eval) of an ONNX model or export directory through ONNX Runtime."


def add_arguments(p):
    p.add_argument("model", help="an .onnx file or an export directory (with tokenizer files)")
    p.add_argument("--ppl", default="wikitext2", help="wikitext2 (raw test split), a text file, or 'none'")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="first N windows only (and N items per task)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks: arc_easy,arc_challenge,boolq,piqa")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's directory)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--out", default=None, help="also write results.json and results.md into this directory")


def evaluate(model, ppl="wikitext2", seqlen=512, limit=None, tasks=None, tokenizer=None, threads=None) -> dict:
    """The result dict of `nm-onnx evaluate` (perplexity and/or tasks)."""
    from nm_onnx.data import eval_windows, load_eval_text, tokenize
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.evaluation.lm_eval_adapter import load_tokenizer
    from nm_onnx.evaluation.perplexity import perplexity_onnx
    from nm_onnx.runtime import make_session, session_dir

    task_names = None
    if tasks:
        from nm_onnx.evaluation.tasks import parse_tasks

        task_names = parse_tasks(tasks)  # fail on a bad name before any slow work
    if (ppl or "none").lower() == "none" and not task_names:
        raise NmOnnxError("nothing to evaluate: give --ppl wikitext2|FILE and/or --tasks")
    sess = make_session(model, threads=threads)
    tok = load_tokenizer(tokenizer or session_dir(model))
    out: dict = {"model": str(model), "op_library": bool(getattr(sess, "nm_onnx_library", False))}
    if ppl and ppl.lower() != "none":
        text = load_eval_text(ppl)
        windows = eval_windows(tokenize(tok, text.text), seqlen, limit)
        res = perplexity_onnx(sess, windows)
        out["perplexity"] = {"data": text.source, **res.to_dict()}
    if task_names:
        from nm_onnx.evaluation.lm_eval_adapter import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, task_names, limit=limit, tokenizer=tok, session=sess)
    return out


def run(args) -> int:
    from pathlib import Path

    from nm_onnx.evaluation.report import evaluation_markdown
    from nm_onnx.io import atomic_file

    res = evaluate(args.model, args.ppl, args.seqlen, args.limit, args.tasks, args.tokenizer, args.threads)
    md = evaluation_markdown(res)
    if args.out:
        with atomic_file(Path(args.out) / "results.json") as f:
            json.dump(res, f, indent=2)
        with atomic_file(Path(args.out) / "results.md") as f:
            f.write(md + "\n")
        print(f"nm-onnx: wrote {args.out}/results.json and results.md", file=sys.stderr)
    print(json.dumps(res, indent=2) if args.json else md)
    return 0
