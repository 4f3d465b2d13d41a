"""PyTorch reference of METHOD.md: criteria, tie/NaN rules, median, mitigations, wrappers, baselines."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nm_onnx.errors import NmOnnxError
from nm_onnx.models import load_hf_model, tiny_random_model
from nm_onnx.recipe import SparsityRecipe
from nm_onnx.reference import (
    amber_factors,
    apply_weight_pruning,
    channel_factors,
    nll_torch,
    nm_mask,
    nm_prune,
    perplexity_torch,
    selection_scores,
    sparse_linear,
    sparse_modules,
    sparsify_model,
    token_mean,
    token_median,
    unsparsify_model,
    variance_scale,
    wanda_factors,
    weight_mask,
)

NAN, INF = float("nan"), float("inf")
T = torch.tensor


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_random_model("llama", tmp_path_factory.mktemp("tiny") / "llama")
    model, tok = load_hf_model(path)
    return model, tok


# ----- masks: hand-checked ----------------------------------------------------------------------
def test_nm_mask_hand_checked():
    assert nm_mask(T([3.0, 1.0, 2.0, 4.0, 0.5, 0.1, 0.2, 0.3]), 2, 4).tolist() == [
        True, False, False, True, True, False, False, True]
    assert nm_prune(T([[-3.0, 1.0, 2.0, -4.0]]), 1, 4).tolist() == [[0.0, 0.0, 0.0, -4.0]]


def test_ties_lower_index_wins():
    assert nm_mask(T([1.0, 1.0, 1.0, 1.0]), 2, 4).tolist() == [True, True, False, False]
    assert nm_mask(T([0.0, 2.0, 2.0, 2.0]), 2, 4).tolist() == [False, True, True, False]
    # |x| ties between +a and -a
    assert nm_prune(T([-2.0, 2.0, 1.0, -2.0]), 2, 4).tolist() == [-2.0, 2.0, 0.0, 0.0]
    # -0 == +0: still a tie, lower index wins
    assert nm_mask(T([-0.0, 0.0]), 1, 2).tolist() == [True, False]
    assert nm_mask(T([0.0, -0.0]), 1, 2).tolist() == [True, False]


def test_nan_ranks_above_inf_and_propagates():
    assert nm_mask(T([INF, NAN, 5.0, 1.0]), 1, 4).tolist() == [False, True, False, False]
    assert nm_mask(T([NAN, NAN, INF, 1.0]), 1, 4).tolist() == [True, False, False, False]
    y = nm_prune(T([1.0, NAN, 3.0, 2.0]), 2, 4)
    assert math.isnan(y[1]) and y.tolist()[2] == 3.0 and y[0] == 0 and y[3] == 0


def test_pruned_inf_becomes_zero_not_nan():
    y = nm_prune(T([INF, 1.0]), 1, 2, score=T([0.0, 1.0]))
    assert y.tolist() == [0.0, 1.0]


def test_k_not_multiple_of_m():
    with pytest.raises(NmOnnxError, match="not a multiple of M=16"):
        nm_mask(torch.ones(2, 24), 8, 16)


def _brute_force_mask(scores: list[float], n: int, m: int) -> list[bool]:
    out = []
    for g in range(0, len(scores), m):
        grp = scores[g:g + m]
        key = sorted(range(len(grp)), key=lambda i: (0 if math.isnan(grp[i]) else 1,
                                                     0.0 if math.isnan(grp[i]) else -grp[i], i))
        keep = set(key[:n])
        out += [i in keep for i in range(len(grp))]
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([(1, 2), (2, 4), (3, 8), (8, 16), (16, 32), (5, 64)]),
    st.data(),
)
def test_mask_matches_brute_force(nm, data):
    n, m = nm
    groups = data.draw(st.integers(1, 3))
    vals = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, INF, -INF, NAN, 1e-30])
    scores = data.draw(st.lists(vals, min_size=groups * m, max_size=groups * m))
    got = nm_mask(T(scores), n, m).tolist()
    assert got == _brute_force_mask(scores, n, m)
    assert sum(got) == groups * n


# ----- median, mean, variance ------------------------------------------------------------------
def test_token_median_lower_for_even_k_and_nan():
    assert token_median(T([[4.0, 1.0, 3.0, 2.0]])).tolist() == [[2.0]]
    assert token_median(T([[5.0, 1.0, 3.0]])).tolist() == [[3.0]]
    assert math.isnan(token_median(T([[1.0, NAN, 3.0, 2.0]]))[0, 0])
    assert token_mean(T([[1.0, 2.0, 3.0, 6.0]])).tolist() == [[3.0]]


def test_variance_scale_hand_checked():
    x = T([[1.0, 2.0, 3.0, 4.0]])  # unbiased var 5/3
    xh = T([[0.0, 0.0, 3.0, 4.0]])  # mean 7/4, unbiased var (3.0625*2 + 1.5625 + 5.0625)/3 = 17/4
    assert variance_scale(x, xh).item() == pytest.approx(math.sqrt((5 / 3) / (17 / 4)), rel=1e-6)
    assert variance_scale(x, torch.zeros(1, 4)).item() == pytest.approx(math.sqrt((5 / 3) / 1e-9), rel=1e-5)


# ----- criteria ----------------------------------------------------------------------------------
def test_channel_factor_criteria_rank_by_scaled_magnitude():
    x = T([[1.0, 2.0, 3.0, 4.0]])
    f = T([10.0, 1.0, 1.0, 1.0])
    assert selection_scores(x, "amber", f).tolist() == [[10.0, 2.0, 3.0, 4.0]]
    assert nm_mask(selection_scores(x, "wanda", f), 1, 4).tolist() == [[True, False, False, False]]
    with pytest.raises(NmOnnxError, match="needs per-channel factors"):
        selection_scores(x, "amber")


def test_clact_uses_column_norms_of_the_call():
    x = T([[1.0, 2.0], [3.0, 0.0]])  # column norms sqrt(10), 2
    s = selection_scores(x, "clact")
    assert torch.allclose(s, T([[math.sqrt(10), 4.0], [3 * math.sqrt(10), 0.0]]))
    assert nm_mask(s, 1, 2).tolist() == [[False, True], [True, False]]  # token 0 differs from magnitude
    one = T([[1.0, -5.0, 2.0, 0.5]])  # a single token: same ranking as magnitude
    assert torch.equal(nm_mask(selection_scores(one, "clact"), 2, 4), nm_mask(one.abs(), 2, 4))


def _amber_independent(w: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(w.astype(np.float64))
    lo, hi = torch.quantile(t.flatten(), torch.tensor([0.005, 0.995], dtype=torch.float64))
    inside = t[(t >= lo) & (t <= hi)]
    wh = (t - inside.mean()) / inside.std()
    c = wh.norm(dim=0)
    return (c / c.min()).numpy()


def test_amber_factors_exact_and_deterministic():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype(np.float32) * 0.02
    w[3, 5] = 4.0  # an outlier the trimming must ignore for mu/sigma
    f = amber_factors(w)
    assert f.dtype == np.float32 and f.shape == (32,) and f.min() == 1.0
    np.testing.assert_allclose(f, _amber_independent(w), rtol=1e-6)
    assert np.array_equal(f, amber_factors(w))  # same factors on every call ...
    assert np.array_equal(f, amber_factors(torch.from_numpy(w)))
    assert np.array_equal(f, channel_factors(w, "amber"))
    code = (
        "import numpy as np; from nm_onnx.reference import amber_factors;"
        "w=(np.random.default_rng(0).standard_normal((48,32)).astype(np.float32)*0.02); w[3,5]=4.0;"
        "print(amber_factors(w).tobytes().hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == f.tobytes().hex()


def test_wanda_factors():
    w = np.array([[3.0, 0.0], [4.0, 1.0]], dtype=np.float32)
    assert wanda_factors(w).tolist() == [5.0, 1.0]
    with pytest.raises(NmOnnxError, match="no channel factors"):
        channel_factors(w, "magnitude")


# ----- the full sparse linear ----------------------------------------------------------------------
@pytest.fixture
def lin():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 16, generator=g), torch.randn(6, 16, generator=g), torch.randn(6, generator=g)


def test_plain_and_bias(lin):
    x, w, b = lin
    y = sparse_linear(x, w, b, n=8, m=16)
    assert torch.allclose(y, nm_prune(x, 8, 16) @ w.T + b, atol=1e-5)


@pytest.mark.parametrize("shift", ["median", "mean"])
def test_dynamic_shift(lin, shift):
    x, w, _ = lin
    eta = token_median(x) if shift == "median" else token_mean(x)
    x_hat = nm_prune(x - eta, 4, 8) + eta
    assert torch.allclose(sparse_linear(x, w, n=4, m=8, shift=shift), x_hat @ w.T, atol=1e-5)


def test_static_and_learned_shift(lin):
    x, w, _ = lin
    eta = torch.tensor([0.3])
    want = (nm_prune(x - 0.3, 2, 4) + 0.3) @ w.T
    assert torch.allclose(sparse_linear(x, w, n=2, m=4, shift="static", static_shift=eta), want, atol=1e-5)
    s = torch.linspace(-1, 1, 16)
    want = (nm_prune(x - s, 2, 4) + s) @ w.T
    assert torch.allclose(sparse_linear(x, w, n=2, m=4, shift="learned", learned_shift=s), want, atol=1e-5)
    with pytest.raises(NmOnnxError, match="static_shift"):
        sparse_linear(x, w, n=2, m=4, shift="static")


def test_variance_correction_and_scale_shift(lin):
    x, w, b = lin
    eta = token_median(x)
    x_hat = nm_prune(x - eta, 2, 4) + eta
    v = torch.sqrt(x.var(-1, keepdim=True) / x_hat.var(-1, keepdim=True))
    got = sparse_linear(x, w, n=2, m=4, shift="median", variance_correction=True)
    assert torch.allclose(got, v * (x_hat @ w.T), atol=1e-4)
    a, bo = torch.linspace(-0.5, 0.5, 6), torch.linspace(0, 1, 6)
    got = sparse_linear(x, w, b, n=2, m=4, variance_correction=True, scale_a=a, scale_b=bo)
    xh = nm_prune(x, 2, 4)
    v = torch.sqrt(x.var(-1, keepdim=True) / xh.var(-1, keepdim=True))
    assert torch.allclose(got, v * (xh @ w.T) * (1 + a) + bo + b, atol=1e-4)


def test_mitigations_hand_checked():
    """W = I so y is x_hat itself; every number below is worked out by hand."""
    eye = torch.eye(4)
    x = T([[10.0, 11.0, 12.0, 0.5]])
    assert sparse_linear(x, eye, n=2, m=4).tolist() == [[0.0, 11.0, 12.0, 0.0]]
    # lower median of [0.5, 10, 11, 12] is 10: x - 10 = [0, 1, 2, -9.5] keeps 2 and -9.5, then + 10
    assert sparse_linear(x, eye, n=2, m=4, shift="median").tolist() == [[10.0, 10.0, 12.0, 0.5]]
    x = T([[1.0, 2.0, 3.0, 4.0]])
    # static eta = 1: [0, 1, 2, 3] keeps 2 and 3 -> [0, 0, 2, 3] + 1
    got = sparse_linear(x, eye, n=2, m=4, shift="static", static_shift=T([1.0]))
    assert got.tolist() == [[1.0, 1.0, 3.0, 4.0]]
    # learned s = x: x - s = 0 everywhere (a 4-way tie, indices 0 and 1 kept, both 0) -> x_hat = s = x
    assert sparse_linear(x, eye, n=2, m=4, shift="learned", learned_shift=x[0]).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # variance correction: x_hat = [0, 0, 3, 4], v = sqrt((5/3) / (17/4))
    got = sparse_linear(x, eye, n=2, m=4, variance_correction=True)
    v = math.sqrt((5 / 3) / (17 / 4))
    assert got[0].tolist() == pytest.approx([0.0, 0.0, 3 * v, 4 * v], rel=1e-6)
    # scale_shift: (x_hat W^T) * (1 + a) + b
    got = sparse_linear(x, eye, n=2, m=4, scale_a=T([1.0, 0.0, 0.5, 0.0]), scale_b=T([0.0, 0.0, 0.0, 1.0]))
    assert got.tolist() == [[0.0, 0.0, 4.5, 5.0]]
    # NaN propagates through the median shift instead of being pruned away
    assert torch.isnan(sparse_linear(T([[1.0, NAN, 3.0, 2.0]]), eye, n=2, m=4, shift="median")).all()


def test_learned_shift_gets_gradients(lin):
    x, w, _ = lin
    s = torch.zeros(16, requires_grad=True)
    sparse_linear(x, w, n=2, m=4, shift="learned", learned_shift=s).pow(2).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_unstructured_keep_count(lin):
    x, _, _ = lin
    r = SparsityRecipe(pattern="unstructured:0.7")
    n, m = r.group(16)
    assert (n, m) == (5, 16)
    assert int((nm_prune(x, n, m) != 0).sum(-1).max()) == 5


# ----- model level -------------------------------------------------------------------------------
def test_sparsify_model_wraps_and_restores(tiny):
    model, _ = tiny
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    with torch.inference_mode():
        dense = model(ids).logits
        sparsify_model(model, "8:16-median-variance")
        assert len(sparse_modules(model)) == 14 and list(model.state_dict()) == keys
        sparse = model(ids).logits
        unsparsify_model(model)
        again = model(ids).logits
    assert not torch.allclose(dense, sparse, atol=1e-3)
    assert torch.equal(dense, again)


def test_sparsify_checks(tiny):
    model, _ = tiny
    with pytest.raises(NmOnnxError, match="does not divide K=64 at site .model.layers.0.self_attn.q_proj."):
        sparsify_model(model, SparsityRecipe(name="t", pattern="3:48"))
    with pytest.raises(NmOnnxError, match="needs calibration constants"):
        sparsify_model(model, "8:16-static-shift")
    assert not sparse_modules(model)


def test_amber_wrapper_equals_functional(tiny):
    model, _ = tiny
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(2))
    lin = model.model.layers[1].mlp.down_proj
    want = sparse_linear(x, lin.weight, n=2, m=4, criterion="amber",
                         channel_scale=torch.from_numpy(amber_factors(lin.weight)))
    sparsify_model(model, "2:4-amber")
    try:
        with torch.inference_mode():
            got = model.model.layers[1].mlp.down_proj(x)
    finally:
        unsparsify_model(model)
    assert torch.equal(got, want)


def test_weight_pruning_exact_nm_masks(tiny, tmp_path):
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for method in ("magnitude", "wanda"):
            calib = np.random.default_rng(0).integers(0, 512, size=(2, 32))
            w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
            norms = None
            if method == "wanda":
                from nm_onnx.reference import collect_input_norms
                norms = collect_input_norms(model, ["model.layers.0.mlp.up_proj"], calib)["model.layers.0.mlp.up_proj"]
            apply_weight_pruning(model, "2:4", method, calib_inputs=calib)
            for name, mod in model.named_modules():
                if name.startswith("model.layers") and isinstance(mod, torch.nn.Linear):
                    nz = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)
                    assert torch.all(nz == 2), name
            w = model.model.layers[0].mlp.up_proj.weight
            score = w0.abs() if norms is None else w0.abs() * norms[None, :]
            assert torch.equal(w != 0, nm_mask(score, 2, 4))
            assert torch.equal(weight_mask(w0, "2:4", norms), w != 0)
            assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()
            model.load_state_dict(state)
        with pytest.raises(NmOnnxError, match="needs calibration inputs"):
            apply_weight_pruning(model, "2:4", "wanda")
    finally:
        model.load_state_dict(state)


def test_weight_mask_hand_checked():
    w = T([[1.0, -3.0, 2.0, 2.0, 0.5, 0.0, -0.5, 0.1],
           [0.0, 0.0, 0.0, 0.0, 0.0, -0.0, 0.0, 0.0]])
    # magnitude 2:4: the largest |w|, ties (2 vs 2, 0.5 vs -0.5, zeros) go to the lower index
    assert weight_mask(w, "2:4").tolist() == [[False, True, True, False, True, False, True, False],
                                             [True, True, False, False, True, True, False, False]]
    # Wanda: |w_ij| * ||X_j||; a large input norm on channel 0 and 7 changes the choice
    norms = T([10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0])
    assert weight_mask(w, "2:4", norms)[0].tolist() == [True, True, False, False, True, False, False, True]
    # exactly N of every M per row, whatever the values (zeros, ties)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(16, 64, generator=g).round()  # many exact ties and zeros
    for pattern, n, m in (("2:4", 2, 4), ("8:16", 8, 16), ("16:32", 16, 32)):
        mask = weight_mask(big, pattern)
        assert torch.all(mask.reshape(16, -1, m).sum(-1) == n), pattern
    assert int(weight_mask(big, "unstructured:0.75").sum(-1).max()) == 16


def test_weight_pruning_pattern_must_divide_k(tiny):
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NmOnnxError, match="does not fit model.layers.0.self_attn.q_proj: K=64"):
        apply_weight_pruning(model, "3:48", "magnitude")
    for k, v in model.state_dict().items():  # nothing was pruned before the check failed
        assert torch.equal(v, state[k]), k


def test_perplexity_matches_hf_loss(tiny):
    model, _ = tiny
    win = np.random.default_rng(3).integers(0, 512, size=(2, 40))
    res = nll_torch(model, win)
    with torch.inference_mode():
        losses = [model(torch.as_tensor(w[None]), labels=torch.as_tensor(w[None])).loss.item() for w in win]
    assert res.tokens == 78 and res.windows == 2
    assert res.perplexity == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    assert perplexity_torch(model, win) == res.perplexity
