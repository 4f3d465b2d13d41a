"""Batched loglikelihood scoring in the lm-eval adapter equals batch 1 (dense and sparse, real ORT)."""

from __future__ import annotations

import lm_eval
import numpy as np
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


def _lm(path, batch_size, max_length=128, session=None):
    sess = session or make_session(path)
    return NmOnnxLM(session=sess, tokenizer=str(tiny_export("llama")), max_length=max_length, batch_size=batch_size)


def _questions(lm, rng, spec):
    """Token-id requests, shuffled: per (context tokens, choice lengths, greedy tokens) of `spec` a random
    context with random continuations of those lengths, plus a batch-1 greedy one when asked."""
    def ids(n):
        return [int(x) for x in rng.integers(3, 512, n)]

    reqs = []
    for n_context, lengths, n_greedy in spec:
        context = ids(n_context)
        conts = [ids(n) for n in lengths] + ([_greedy(lm, context, n_greedy)] if n_greedy else [])
        reqs += [(("", ""), context, c) for c in conts]
    return [reqs[i] for i in rng.permutation(len(reqs))]


def _greedy(lm, context, n):
    """The n tokens batch-1 greedy decoding appends to `context` (a continuation scored as greedy)."""
    ids = list(context)
    for _ in range(n):
        ids.append(int(lm._logprobs(ids)[-1].argmax()))
    return ids[len(context):]


@pytest.fixture(scope="module")
def shared_requests(models):
    """Token-id requests (max_length 32), several continuations per context, in shuffled order.

    Shared: a 4-choice question (+ a greedy choice), a 3-choice one and one exactly at max_length.
    Not shared: a 1-token context, a context cut on the left, a group with one choice too long,
    a context seen once."""
    return _questions(_lm(models["dense"], 1), np.random.default_rng(0), [
        (12, [1, 3, 2, 5], 3),
        (7, [4, 4, 1], 2),
        (30, [3, 1, 2], 0),  # 30 + 3 = max_length + 1: fits, uncut
        (1, [2, 3, 1], 2),
        (40, [2, 3, 2, 4], 0),  # cut on the left
        (28, [2, 6], 0),  # 28 + 6 > max_length + 1: the whole group takes the padded path
        (9, [3], 0),
    ])


@pytest.mark.parametrize("kind", ["dense", "magnitude"])
@pytest.mark.parametrize("bs", [3, 4])
def test_shared_contexts_equal_batch_one(models, shared_requests, kind, bs):
    one = _lm(models[kind], 1, max_length=32)._loglikelihood_tokens(shared_requests, disable_tqdm=True)
    lm = _lm(models[kind], bs, max_length=32)
    shared, rest = lm._shared_contexts(shared_requests)
    assert sorted(len(g) for g in shared) == [3, 4, 5] and len(rest) == 11  # both paths are taken
    got = lm._loglikelihood_tokens(shared_requests, disable_tqdm=True)
    assert len(got) == len(one)
    for (a, ga), (b, gb) in zip(one, got):
        assert abs(a - b) < 1e-4, (kind, bs, a, b)
        assert ga == gb
    if kind == "dense":
        assert sum(g for _, g in one) >= 3  # the greedy choices (and 1-token ones that happen to match)


@pytest.fixture(scope="module")
def many_questions(models):
    """Token-id requests (max_length 128): 7 questions of 5 to 40 context tokens, 2-4 choices of
    1 to 6 tokens each (one greedy choice in three questions), in shuffled order: the adapter must
    split them into calls of one context length each."""
    return _questions(_lm(models["dense"], 1), np.random.default_rng(2), [
        (5, [2, 6, 1], 2),
        (40, [3, 1], 0),
        (14, [4, 2, 5, 1], 0),
        (22, [1, 3, 6], 3),
        (9, [5, 2], 0),
        (31, [2, 4, 3, 6], 0),
        (17, [6, 1], 1),
    ])


@pytest.mark.parametrize("kind", ["dense", "magnitude"])
@pytest.mark.parametrize("bs", [4, 8])
def test_many_questions_per_call_equal_batch_one(models, many_questions, kind, bs):
    one = _lm(models[kind], 1)._loglikelihood_tokens(many_questions, disable_tqdm=True)
    lm = _lm(models[kind], bs)
    shared, rest = lm._shared_contexts(many_questions)
    assert len(shared) == 7 and rest == []
    got = lm._loglikelihood_tokens(many_questions, disable_tqdm=True)
    assert len(got) == len(one)
    for (a, ga), (b, gb) in zip(one, got):
        assert abs(a - b) < 1e-4, (kind, bs, a, b)
        assert ga == gb
    if kind == "dense":
        assert sum(g for _, g in one) >= 3


class _CountingSession:
    """A real ORT session that counts its run calls."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)

    def __getattr__(self, name):  # get_inputs, get_outputs, get_modelmeta, ...
        return getattr(self.session, name)


def test_shared_contexts_run_several_questions_per_call(models):
    rng = np.random.default_rng(1)
    reqs = [(("", ""), context, [int(x) for x in rng.integers(3, 512, n)])
            for context in ([5, 17, 42, 99, 7, 8], [300, 301, 302, 303, 304, 305], list(range(9, 15)),
                            [60, 61, 62, 63, 64, 65])
            for n in (1, 2, 3, 4)]
    results, runs = [], []
    for bs in (1, 4, 16):
        sess = _CountingSession(make_session(models["dense"]))
        results.append(_lm(None, bs, session=sess)._loglikelihood_tokens(reqs, disable_tqdm=True))
        runs.append(sess.runs)
    # batch 4: one prefix call for the 4 questions (one context length), then 4 calls of 4 rows; batch 16: 1 + 1
    assert runs == [16, 5, 2]
    # contexts of different lengths never share a call (their rows' pasts would need padding): 1 + 1 each
    mixed = [(q, c[:k], t) for (q, c, t), k in zip(reqs, [6] * 4 + [5] * 4 + [4] * 4 + [3] * 4)]
    sess = _CountingSession(make_session(models["dense"]))
    _lm(None, 16, session=sess)._loglikelihood_tokens(mixed, disable_tqdm=True)
    assert sess.runs == 8
    for res in results[1:]:
        for (a, ga), (b, gb) in zip(results[0], res):
            assert abs(a - b) < 1e-4 and ga == gb


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
