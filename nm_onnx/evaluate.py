"""`evaluate`: perplexity and zero-shot accuracy of an ONNX model through ONNX Runtime (library function).

Perplexity: non-overlapping windows of the evaluation text (the paper's protocol) with the model's
BOS convention (nm_onnx.data), scored as each window's logits arrive (nm_onnx.scoring). Zero-shot
tasks: lm-eval-harness with the `nm-onnx` model type over the same session, task data read offline
(nm_onnx.evaluation.tasks); lm-eval is imported only when tasks are asked for.
"""

from __future__ import annotations


def evaluate(model, ppl="wikitext2", seqlen=512, limit=None, tasks=None, tokenizer=None, threads=None,
             bos="auto", batch_size=1) -> dict:
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

        out["tasks"] = evaluate_tasks(model, task_names, limit=limit, tokenizer=tok, session=sess, bos=bos,
                                       batch_size=batch_size)
    return out
