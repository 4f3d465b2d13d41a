"""`nm-onnx evaluate MODEL`: the CLI of nm_onnx.evaluate (perplexity and zero-shot tasks through ORT).

Output: a Markdown table (default) or JSON (--json); --out DIR writes both (results.json,
results.md) into an evaluation directory, checked before the evaluation starts so a long run never
ends in a failed write.
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
    p.add_argument("--batch-size", type=positive, default=1,
                   help="zero-shot requests per ORT call (default 1; a clact model always uses 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--out", default=None, help="also write results.json and results.md into this directory")
    add_overwrite(p)


def run(args) -> int:
    from pathlib import Path

    from nm_onnx.evaluation.report import evaluation_markdown
    from nm_onnx.io import atomic_dir, check_output_dir

    if args.out:
        check_output_dir(args.out, "evaluation", [args.model], args.overwrite, option="--out")
    from nm_onnx.evaluate import evaluate

    res = evaluate(args.model, args.ppl, args.seqlen, args.limit, args.tasks, args.tokenizer, args.threads,
                   args.bos, args.batch_size)
    md = evaluation_markdown(res)
    if args.out:
        with atomic_dir(args.out, "evaluation", args.overwrite, inputs=[args.model]) as tmp:
            (Path(tmp) / "results.json").write_text(json.dumps(res, indent=2) + "\n")
            (Path(tmp) / "results.md").write_text(md + "\n")
        print(f"nm-onnx: wrote {args.out}/results.json and results.md", file=sys.stderr)
    print(json.dumps(res, indent=2) if args.json else md)
    return 0
