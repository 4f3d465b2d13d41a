"""lm-eval adapter: model type `nm-onnx` over ORT sessions, offline tasks, numbers checked against torch."""

from __future__ import annotations

import subprocess
import sys

import lm_eval
import numpy as np
import pytest
from models_cache import tiny_export, tiny_hf

from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.lm_eval_adapter import NmOnnxLM
from nm_onnx.evaluation.tasks import KNOWN_TASKS, parse_tasks, task_dir, task_manager


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lm():
    return NmOnnxLM(path=str(tiny_export("llama")))


def test_registered_model_type():
    from lm_eval.api.registry import get_model

    assert get_model("nm-onnx") is NmOnnxLM


def test_simple_evaluate_offline_task_returns_accuracy():
    """A tiny offline multiple-choice task (4 ARC-Easy items) through lm_eval.simple_evaluate."""
    res = lm_eval.simple_evaluate(
        model="nm-onnx", model_args=f"path={tiny_export('llama')}", tasks=["arc_easy"], num_fewshot=0,
        limit=4, task_manager=task_manager(["arc_easy"]), bootstrap_iters=0,
    )
    r = res["results"]["arc_easy"]
    assert 0.0 <= r["acc,none"] <= 1.0 and 0.0 <= r["acc_norm,none"] <= 1.0
    assert res["n-samples"]["arc_easy"]["effective"] == 4


def test_loglikelihood_matches_torch(lm):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf("llama")).eval()
    ctx, cont = "Question: what is the sun?\nAnswer:", " a star"
    (ll, greedy), = lm.loglikelihood([_Req(ctx, cont)], disable_tqdm=True)
    c_ids, t_ids = lm._encode_pair(ctx, cont)
    ids = torch.tensor([c_ids + t_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    n = len(t_ids)
    ref = float(lp[-n - 1:-1].gather(-1, torch.tensor(t_ids)[:, None]).sum())
    assert abs(ll - ref) < 1e-3 * max(1.0, abs(ref))
    assert greedy == bool((lp[-n - 1:-1].argmax(-1) == torch.tensor(t_ids)).all())


def test_rolling_and_generate(lm):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (total,) = lm.loglikelihood_rolling([_Req(text)], disable_tqdm=True)
    assert np.isfinite(total) and total < 0
    (out,) = lm.generate_until([_Req("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 5})],
                               disable_tqdm=True)
    assert isinstance(out, str)
    # greedy decoding with the KV cache equals greedy decoding by full recomputation
    ids = lm.tok_encode("Once upon a time")
    seq = list(ids)
    for _ in range(5):
        seq.append(int(np.argmax(lm._logprobs(seq)[-1])))
    assert lm.generate_greedy(ids, 5) == lm.tok_decode(seq[len(ids):])


def test_unknown_task_lists_known_ones():
    with pytest.raises(NmOnnxError, match="unknown task 'hellaswag'.*arc_easy, arc_challenge, boolq, piqa"):
        parse_tasks("arc_easy,hellaswag")
    assert parse_tasks("piqa, boolq") == ["piqa", "boolq"]


def test_offline_task_files_have_all_rows():
    d = task_dir(list(KNOWN_TASKS))
    counts = {t: len((d / f"{t}.jsonl").read_text().splitlines()) for t in KNOWN_TASKS}
    assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "piqa": 1838}


def test_lm_eval_cli_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "nm_onnx.evaluation.lm_eval_cli", "--model", "nm-onnx", "--model_args",
         f"path={tiny_export('llama')}", "--tasks", "piqa", "--limit", "2"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "piqa" in r.stdout and "acc" in r.stdout
