"""`nm-onnx evaluate MODEL`: perplexity and zero-shot accuracy of an ONNX model through ONNX Runtime.

Perplexity: non-overlapping windows (the paper's protocol), with the model's BOS convention
(nm_onnx.data). Zero-shot tasks: lm-eval-harness with the `nm-onnx` model type over the same session,
task data read offline (nm_onnx.evaluation.tasks). Output: a Markdown table (default) or JSON
(--json); --out DIR writes both (results.json, results.md) into an evaluation directory, checked
before the evaluation starts so a long run never ends in a failed write.
"""

from __future__ import annotations

import json
import sys

from nm_onnx.commands._args import add_overwrite, at_least, positive

NAME = "evaluate"
HELP = "Perplexity and zero-shot tasks (lm-eval) of an ONNX model or export directory through ONNX Runtime."


def add_arguments(p):
    from nm_onnx.data import BOS_CHOICES

    p.add_argument("model", help="an .onnx file or an export directory (with tokenizer files)")
    p.add_argument("--ppl", default="wikitext2", help="wikitext2 (raw test split), a text file, or 'none'")
    p.add_argument("--seqlen", type=at_least(2), default=512, help="tokens per window (default 512)")
    p.add_argument("--limit", type=positive, default=None, help="first N windows only (and N items per task)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks: arc_easy,arc_challenge,boolq,piqa")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's directory)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="begin every window with the BOS token: auto (as the tokenizer does), always, never")
    p.add_argument("--threads", type=positive, default=None, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--out", default=None, help="also write results.json and results.md into this directory")
    add_overwrite(p)


def evaluate(model, ppl="wikitext2", seqlen=512, limit=None, tasks=None, tokenizer=None, threads=None,
             bos="auto") -> dict:
    """The result dict of `nm-onnx evaluate` (perplexity and/or tasks)."""
    from nm_onnx.data import bos_id, eval_windows, load_eval_text, tokenize
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.evaluation.tokenizer import load_tokenizer
    from nm_onnx.graph.load import read_proto
    from nm_onnx.models import check_context
    from nm_onnx.runtime import make_session, session_dir

    task_names = None
    if tasks:
        from nm_onnx.evaluation.tasks import parse_tasks

        task_names = parse_tasks(tasks)  # fail on a bad name before any slow work
    use_ppl = (ppl or "none").lower() != "none"
    if not use_ppl and not task_names:
        raise NmOnnxError("nothing to evaluate: give --ppl wikitext2|FILE and/or --tasks")
    proto = read_proto(model)  # a corrupt model or missing data file: named before anything else
    if use_ppl:
        text = load_eval_text(ppl, option="--ppl")
        check_context(session_dir(model), seqlen, "--seqlen")
    tok = load_tokenizer(tokenizer or session_dir(model), option="--tokenizer")
    sess = make_session(model, threads=threads, proto=proto)
    del proto
    out: dict = {"model": str(model), "op_library": bool(getattr(sess, "nm_onnx_library", False))}
    if use_ppl:
        from nm_onnx.evaluation.perplexity import perplexity_onnx

        first = bos_id(tok, bos)
        windows = eval_windows(tokenize(tok, text.text), seqlen, limit, first)
        res = perplexity_onnx(sess, windows)
        out["perplexity"] = {"data": text.source, "bos": first is not None, **res.to_dict()}
    if task_names:
        from nm_onnx.evaluation.lm_eval_adapter import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, task_names, limit=limit, tokenizer=tok, session=sess, bos=bos)
    return out


def run(args) -> int:
    from pathlib import Path

    from nm_onnx.evaluation.report import evaluation_markdown
    from nm_onnx.io import atomic_dir, check_output_dir

    if args.out:
        check_output_dir(args.out, "evaluation", [args.model], args.overwrite, option="--out")
    res = evaluate(args.model, args.ppl, args.seqlen, args.limit, args.tasks, args.tokenizer, args.threads,
                   args.bos)
    md = evaluation_markdown(res)
    if args.out:
        with atomic_dir(args.out, "evaluation", args.overwrite, inputs=[args.model]) as tmp:
            (Path(tmp) / "results.json").write_text(json.dumps(res, indent=2) + "\n")
            (Path(tmp) / "results.md").write_text(md + "\n")
        print(f"nm-onnx: wrote {args.out}/results.json and results.md", file=sys.stderr)
    print(json.dumps(res, indent=2) if args.json else md)
    return 0
