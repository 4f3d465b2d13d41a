"""The two oracles tied together: the numpy op reference (nm_onnx.ops.reference) and the PyTorch
reference of METHOD.md (nm_onnx.reference.functional), on ties, +-0, +-inf and NaN.

- The numpy fast ranking (`keep_from_scores`, a lexsort) equals the rank definition itself
  (`keep_from_scores_pairwise`: rank_j = #better + #equal at a lower index, keep rank < n).
- torch's stable-sort mask equals the numpy mask bit for bit on the same scores, and the pruned
  activations (magnitude, a channel factor, clact on exactly summable values) are the same bits.
- The lower median is the same number (-0 == +0: the ops return +0, torch may return -0); the mean
  and the variance factor agree to float32 rounding (numpy sums in float64, torch in float32), with
  the same NaN and inf entries; the whole sparse linear layer agrees to GEMM tolerance.
Known differences, left out of the torch comparisons: torch's unbiased variance of a single feature
(K = 1) is NaN where the ops define v = 1 for K < 2 (docs/ops.md), and the torch clact column norms
fail on an empty row (K = 0: `reshape(-1, 0)`); no real layer has K < 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_gemm_close, kinds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nm_onnx.ops import reference as ref
from nm_onnx.ops.testing import SPECIALS, TIES, assert_same, random_values
from nm_onnx.reference import functional as F

pytestmark = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.filterwarnings("ignore:var.*degrees of freedom:UserWarning"),  # torch.var over no token (T = 0)
]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

group_sizes = st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64, 100])
special_floats = st.sampled_from([float(v) for v in np.concatenate([SPECIALS, TIES])])
score_values = special_floats | st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def grouped_scores(draw):
    """float32 scores [T, G * m] full of ties, +-0, +-inf and NaN, with m and an n in 0..m."""
    m = draw(group_sizes)
    shape = (draw(st.integers(0, 3)), m * draw(st.integers(0, 3)))
    scores = draw(hnp.arrays(np.float32, shape, elements=score_values))
    return scores, draw(st.integers(0, m)), m


@SETTINGS
@given(case=grouped_scores())
def test_fast_ranking_equals_the_rank_definition(case):
    scores, n, m = case
    np.testing.assert_array_equal(
        ref.keep_from_scores(scores, n, m), ref.keep_from_scores_pairwise(scores, n, m)
    )


@SETTINGS
@given(case=grouped_scores())
def test_torch_mask_equals_numpy_mask(case):
    scores, n, m = case
    np.testing.assert_array_equal(
        F.nm_mask(torch.from_numpy(scores), n, m).numpy(), ref.keep_from_scores(scores, n, m)
    )


def activations(seed, lead, groups, m, kind):
    return random_values(np.random.default_rng(seed), (*lead, m * groups), kind)


leading = st.lists(st.integers(0, 3), min_size=1, max_size=3)
seeds = st.integers(0, 2**31)


@SETTINGS
@given(
    m=group_sizes,
    n_frac=st.floats(0, 1),
    lead=leading,
    groups=st.integers(1, 3),
    kind=kinds,
    criterion=st.sampled_from(["magnitude", "amber", "clact"]),
    seed=seeds,
)
def test_pruned_activations_are_the_same_bits(m, n_frac, lead, groups, kind, criterion, seed):
    """nm_prune of the torch reference = NMMask of the numpy reference (pruned entries +0)."""
    n = round(n_frac * m)
    kind = "ties" if criterion == "clact" else kind  # clact column norms: float32 (torch) vs float64 sums
    x = activations(seed, lead, groups, m, kind)
    xt = torch.from_numpy(x)
    cs = (
        np.random.default_rng(seed)
        .choice(np.array([0.5, 1.0, 2.0, 3.0]), size=x.shape[-1])
        .astype(np.float32)
    )
    if criterion == "amber":
        got = F.nm_prune(xt, n, m, F.selection_scores(xt, "amber", torch.from_numpy(cs)))
        want = ref.nm_mask(x, n, m, "magnitude", cs)
    else:
        got = F.nm_prune(xt, n, m, F.selection_scores(xt, criterion))
        want = ref.nm_mask(x, n, m, criterion)
    assert_same(got.numpy(), want)


@SETTINGS
@given(lead=leading, k=st.integers(1, 40), kind=kinds, seed=seeds)
def test_median_and_mean_agree(lead, k, kind, seed):
    x = random_values(np.random.default_rng(seed), (*lead, k), kind)
    xt = torch.from_numpy(x)
    np.testing.assert_array_equal(F.token_median(xt).numpy(), ref.token_shift(x, "median")[1])  # -0 == +0
    mean_t, mean_np = F.token_mean(xt).numpy(), ref.token_shift(x, "mean")[1]
    np.testing.assert_array_equal(np.isnan(mean_t), np.isnan(mean_np))
    np.testing.assert_allclose(mean_t, mean_np, rtol=1e-5, atol=1e-6)  # inf == inf, same sign


@SETTINGS
@given(m=st.sampled_from([2, 4, 8, 16]), lead=leading, groups=st.integers(1, 3), kind=kinds, seed=seeds)
def test_variance_factor_agrees(m, lead, groups, kind, seed):
    x = activations(seed, lead, groups, m, kind)
    xh = ref.nm_mask(x, m // 2, m)
    got = F.variance_scale(torch.from_numpy(x), torch.from_numpy(xh)).numpy()[..., 0]
    x2, xh2 = ref._rows(x), ref._rows(xh)
    want = ref.variance_scale(x2, xh2).reshape(got.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-4)


@SETTINGS
@given(
    m=st.sampled_from([2, 4, 8, 16]),
    lead=leading,
    groups=st.integers(1, 3),
    o=st.integers(1, 4),
    kind=kinds,
    shift=st.sampled_from(["none", "median"]),
    vc=st.booleans(),
    seed=seeds,
)
def test_sparse_linear_agrees_with_nm_sparse_matmul(m, lead, groups, o, kind, shift, vc, seed):
    """METHOD.md's deployable layer in torch = NMSparseMatMul with shift_bias = W 1 (finite weights)."""
    rng = np.random.default_rng(seed)
    x = activations(seed, lead, groups, m, kind)
    w = rng.standard_normal((o, x.shape[-1])).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    got = F.sparse_linear(
        torch.from_numpy(x),
        torch.from_numpy(w),
        torch.from_numpy(bias),
        n=m // 2,
        m=m,
        shift=shift,
        variance_correction=vc,
    ).numpy()
    b = np.ascontiguousarray(w.T)
    sb = w.sum(1) if shift != "none" else None
    want = ref.nm_sparse_matmul(x, b, m // 2, m, shift, int(vc), shift_bias=sb, bias=bias)
    assert_gemm_close(got, want, x, b, m // 2, m, shift, int(vc), shift_bias=sb)
