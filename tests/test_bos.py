"""The beginning-of-sequence token: every path follows the model's own convention (issue 12, section 6).

A tiny random Llama whose tokenizer adds a BOS token (like Gemma / Llama 2-3 tokenizers): perplexity
through ORT and PyTorch, calibration and validate all start every window with it (and agree with
each other); `--bos never` removes it; the lm-eval adapter's log-likelihoods equal lm-eval's own
`hf` model on the same model and task, request by request.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from models_cache import tiny_bos_export, tiny_export, tiny_hf

from nm_onnx import ops
from nm_onnx.data import adds_bos, bos_id, calibration_windows, eval_windows, load_eval_text, tokenize
from nm_onnx.evaluation.tokenizer import load_tokenizer

needs_library = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_hf("llama", bos=True))


def test_windows_start_with_the_bos_of_a_bos_tokenizer(tok):
    assert adds_bos(tok) and not adds_bos(load_tokenizer(tiny_hf("llama")))
    first = bos_id(tok)
    assert first == tok.bos_token_id and bos_id(tok, "never") is None
    ids = tokenize(tok, load_eval_text("wikitext2").text)
    w = eval_windows(ids, 64, 3, first)
    assert w.shape == (3, 64) and (w[:, 0] == first).all()
    np.testing.assert_array_equal(w[:, 1:].reshape(-1), ids[: 3 * 63])  # every text token once, in order
    c = calibration_windows(ids, 4, 32, 0, first)
    assert c.shape == (4, 32) and (c[:, 0] == first).all()
    with pytest.raises(Exception, match="has no BOS token"):
        bos_id(load_tokenizer(tiny_hf("llama")), "always")


def test_every_perplexity_path_uses_the_bos(tok, tmp_path):
    from nm_onnx.models import load_hf_model
    from nm_onnx.reference.perplexity import nll_torch

    exp, hf = tiny_bos_export(), tiny_hf("llama", bos=True)
    r = run_cli("evaluate", exp, "--seqlen", "64", "--limit", "2", "--json")
    assert r.returncode == 0, r.stderr
    ort = json.loads(r.stdout)["perplexity"]
    assert ort["bos"] is True
    model, _ = load_hf_model(hf)
    windows = eval_windows(tokenize(tok, load_eval_text("wikitext2").text), 64, 2, tok.bos_token_id)
    assert ort["perplexity"] == pytest.approx(nll_torch(model, windows).perplexity, rel=1e-4)
    r = run_cli("evaluate-torch", hf, "--recipe", "dense", "--seqlen", "64", "--limit", "2", "--json")
    assert r.returncode == 0, r.stderr
    twin = json.loads(r.stdout)
    assert twin["bos"] is True and twin["perplexity"] == pytest.approx(ort["perplexity"], rel=1e-4)
    r = run_cli("evaluate", exp, "--seqlen", "64", "--limit", "2", "--json", "--bos", "never")
    assert r.returncode == 0 and json.loads(r.stdout)["perplexity"]["bos"] is False
    # --bos never scores the windows without BOS (on a random tiny model the two perplexities are close:
    # each path is tied to the reference on its own windows, tighter than the gap between them)
    plain = eval_windows(tokenize(tok, load_eval_text("wikitext2").text), 64, 2, None)
    assert [w[0] for w in plain] != [w[0] for w in windows]
    never, want = json.loads(r.stdout)["perplexity"]["perplexity"], nll_torch(model, plain).perplexity
    assert never == pytest.approx(want, rel=1e-5) and ort["perplexity"] == pytest.approx(
        nll_torch(model, windows).perplexity, rel=1e-5)
    assert abs(never - ort["perplexity"]) > 10 * 1e-5 * ort["perplexity"]


@needs_library
def test_calibration_and_validate_use_the_bos(tok, tmp_path):
    hf, exp = tiny_hf("llama", bos=True), tiny_bos_export()
    cal = tmp_path / "cal"
    r = run_cli("calibrate", hf, "--recipe", "8:16-static-shift", "--samples", "2", "--seqlen", "32", "--out", cal,
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((cal / "report.json").read_text())["bos"] == tok.bos_token_id
    sparse = tmp_path / "sparse"
    assert run_cli("transform", exp, sparse, "--recipe", "8:16-static-shift", "--calibration", cal).returncode == 0
    rep = tmp_path / "v.json"
    r = run_cli("validate", exp, sparse, "--model", hf, "--recipe", "8:16-static-shift", "--calibration", cal,
                "--seqlen", "64", "--limit", "2", "--checks", "abc", "--json", rep)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert json.loads(rep.read_text())["bos"] == tok.bos_token_id


@pytest.mark.parametrize("bos", [True, False])
def test_lm_eval_adapter_equals_lm_evals_hf_model(bos):
    """Same model, same offline tasks: per-request log-likelihoods within 1e-4, identical accuracies."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from nm_onnx.evaluation.lm_eval_adapter import NmOnnxLM
    from nm_onnx.evaluation.tasks import task_manager

    hf = tiny_hf("llama", bos=bos)
    exp = tiny_bos_export() if bos else tiny_export("llama")
    tasks = ["arc_easy", "piqa"]

    def run(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=6, task_manager=task_manager(tasks),
                                       bootstrap_iters=0, log_samples=True)

    adapter = NmOnnxLM(path=str(exp))
    assert (adapter.tok_encode("Question: why?")[0] == adapter.tokenizer.bos_token_id) is bos
    ours = run(adapter)
    theirs = run(HFLM(pretrained=str(hf), device="cpu", batch_size=1, dtype="float32"))
    for t in tasks:
        a = [float(choice[0][0]) for s in ours["samples"][t] for choice in s["resps"]]
        b = [float(choice[0][0]) for s in theirs["samples"][t] for choice in s["resps"]]
        assert len(a) == len(b) > 6
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][t][metric] == theirs["results"][t][metric]
