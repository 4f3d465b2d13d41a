"""Batched loglikelihood scoring in the lm-eval adapter equals batch 1 (dense and sparse, real ORT)."""

from __future__ import annotations

import lm_eval
import pytest
from models_cache import tiny_export

from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.lm_eval_adapter import NmOnnxLM
from nm_onnx.evaluation.tasks import task_manager
from nm_onnx.runtime import make_session


class _Req:
    def __init__(self, *args):
        self.args = args


_PAIRS = [
    ("Question: what is the sun?\nAnswer:", " a star"),
    ("The capital of France is", " Paris, a large city with a long history"),
    ("", " hello"),
    ("A fairly long context that makes this request the longest one of the whole batch by far. " * 3, " yes"),
    ("Q: 2+2?\nA:", " 4"),
    ("Which animal barks?", " the dog"),
    ("Short", " one two three four five six seven"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from nm_onnx.transform import transform

    d = tmp_path_factory.mktemp("batch")
    dense = tiny_export("llama")
    transform(dense, d / "magnitude", "8:16-magnitude")
    transform(dense, d / "clact", "8:16-clact")
    return {"dense": dense, "magnitude": d / "magnitude", "clact": d / "clact"}


def _lls(path, batch_size):
    sess = make_session(path)
    lm = NmOnnxLM(session=sess, tokenizer=str(tiny_export("llama")), max_length=128, batch_size=batch_size)
    return lm, lm.loglikelihood([_Req(c, t) for c, t in _PAIRS], disable_tqdm=True)


@pytest.mark.parametrize("kind", ["dense", "magnitude"])
def test_batched_loglikelihoods_equal_batch_one(models, kind):
    _, one = _lls(models[kind], 1)
    lm4, four = _lls(models[kind], 4)
    assert lm4.batch_size == 4
    for (a, ga), (b, gb) in zip(one, four):
        assert abs(a - b) < 1e-4, (kind, a, b)
        assert ga == gb


@pytest.mark.parametrize("kind", ["dense", "magnitude"])
def test_batched_accuracies_identical(models, kind):
    def acc(bs):
        res = lm_eval.simple_evaluate(
            model="nm-onnx", model_args=f"path={models[kind]},tokenizer={tiny_export('llama')},batch_size={bs}",
            tasks=["arc_easy"], num_fewshot=0, limit=12, task_manager=task_manager(["arc_easy"]),
            bootstrap_iters=0,
        )
        r = res["results"]["arc_easy"]
        return r["acc,none"], r["acc_norm,none"]

    assert acc(1) == acc(8)


def test_clact_model_stays_at_batch_one(models, capsys):
    lm, _ = _lls(models["clact"], 4)
    assert lm.batch_size == 1
    assert lm.batch_blocker == ["clact"]
    err = capsys.readouterr().err
    assert "clact" in err and "scoring at batch 1" in err
    assert _lls(models["magnitude"], 4)[0].batch_blocker == []


def test_bad_batch_size_is_one_line():
    with pytest.raises(NmOnnxError, match="batch_size='auto'"):
        NmOnnxLM(path=str(tiny_export("llama")), batch_size="auto")
