"""`nm-onnx evaluate`: ORT perplexity equals torch's on the same windows; tasks; JSON/Markdown; errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from models_cache import tiny_export, tiny_hf


def test_evaluate_perplexity_matches_torch(tmp_path):
    from nm_onnx.data import eval_windows, load_eval_text, tokenize
    from nm_onnx.models import load_hf_model
    from nm_onnx.reference.perplexity import nll_torch

    out = tmp_path / "res"
    r = run_cli("evaluate", str(tiny_export("llama")), "--seqlen", "48", "--limit", "3", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["perplexity"]["windows"] == 3 and res["perplexity"]["seqlen"] == 48
    assert res["perplexity"]["tokens"] == 3 * 47
    model, tok = load_hf_model(tiny_hf("llama"))
    windows = eval_windows(tokenize(tok, load_eval_text("wikitext2").text), 48, 3)
    ref = nll_torch(model, windows).perplexity
    assert abs(res["perplexity"]["perplexity"] / ref - 1) < 1e-4
    assert json.loads((out / "results.json").read_text()) == res
    md = (out / "results.md").read_text()
    assert "| data | windows x seqlen | tokens | perplexity |" in md


def test_evaluate_tasks_markdown():
    r = run_cli("evaluate", str(tiny_export("llama")), "--ppl", "none", "--tasks", "boolq,piqa", "--limit", "2")
    assert r.returncode == 0, r.stderr
    assert "| boolq | 2 |" in r.stdout and "| piqa | 2 |" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--tasks", "arc_easy,nope"), "unknown task 'nope'; known offline tasks: arc_easy"),
        (("--ppl", "none"), "nothing to evaluate"),
        (("--ppl", "/no/such/file.txt"), "neither 'wikitext2' nor an existing text file"),
    ],
)
def test_evaluate_bad_input_one_line_exit_2(args, needle):
    r = run_cli("evaluate", str(tiny_export("llama")), *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
