"""Markdown tables for evaluation results (the JSON form is the plain dict)."""

from __future__ import annotations


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def evaluation_markdown(result: dict) -> str:
    """Markdown of an `nm-onnx evaluate` result dict."""
    out = [f"# nm-onnx evaluate: {result['model']}", ""]
    ppl = result.get("perplexity")
    if ppl:
        out += [
            markdown_table(
                ["data", "windows x seqlen", "tokens", "perplexity"],
                [[ppl["data"], f"{ppl['windows']} x {ppl['seqlen']}", ppl["tokens"], ppl["perplexity"]]],
            ),
            "",
        ]
    tasks = result.get("tasks")
    if tasks:
        rows = [[t, m.get("samples"), m.get("acc"), m.get("acc_norm")] for t, m in tasks.items()]
        out += ["Zero-shot (lm-eval, 0-shot, offline data):", "",
                markdown_table(["task", "samples", "acc", "acc_norm"], rows), ""]
    return "\n".join(out)
