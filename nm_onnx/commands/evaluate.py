"""`nm-onnx evaluate MODEL`: perplexity of an ONNX model through ONNX Runtime (+ the op library)."""

from __future__ import annotations

import json

NAME = "evaluate"
HELP = "Perplexity (non-overlapping windows) of an ONNX model or export directory through ONNX Runtime."


def add_arguments(p):
    p.add_argument("model", help="an .onnx file or an export directory (with tokenizer files)")
    p.add_argument("--ppl", default="wikitext2", help="wikitext2 (raw test split) or a text file")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="first N windows only")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's directory)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from transformers import AutoTokenizer

    from nm_onnx.data import eval_windows, load_eval_text, tokenize
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.evaluation.perplexity import perplexity_onnx
    from nm_onnx.runtime import make_session, session_dir

    sess = make_session(args.model, threads=args.threads)
    tok_src = args.tokenizer or session_dir(args.model)
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_src))
    except Exception as e:
        raise NmOnnxError(f"no tokenizer at {tok_src} ({type(e).__name__}); pass --tokenizer") from None
    text = load_eval_text(args.ppl)
    windows = eval_windows(tokenize(tok, text.text), args.seqlen, args.limit)
    res = perplexity_onnx(sess, windows)
    out = {"model": str(args.model), "data": text.source, **res.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"perplexity {res.perplexity:.4f} over {res.windows} windows x {res.seqlen} ({text.source})")
    return 0
