"""Functional PyTorch reference of METHOD.md: scores, the N:M mask, shifts, variance correction.

Every formula of the method lives here exactly once; the module wrapper (`modules.py`), the
weight-pruning baselines and calibration all call these functions, and they are the oracle the ONNX
ops are checked against. Contract details fixed here (and by METHOD.md):

* Tie rule: among equal scores the lower index wins; a NaN score ranks above every number (+inf
  included), so NaN activations are kept and propagate; -0 == +0. Implemented with a *stable*
  descending sort (never `torch.topk`, which guarantees no tie order).
* Median: the lower median for even K (`torch.median`); a row holding a NaN has a NaN median (and a
  NaN mean), so the fault propagates instead of being hidden.
* Pruned entries are set to exactly 0 with `torch.where` (never `x * mask`, which turns a pruned
  +-inf into NaN).
"""

from __future__ import annotations

import torch

from nm_onnx.errors import NmOnnxError

# The method's constants and the numpy channel factors are defined once, torch-free, in nm_onnx.method.
from nm_onnx.method import (  # noqa: F401 - re-exported: the reference's public API
    AMBER_QUANTILES,
    CHANNEL_FACTOR_CRITERIA,
    CLACT_EPS,
    VAR_EPS,
    amber_factors,
    channel_factors,
    wanda_factors,
)


# ----- ranking and masks ---------------------------------------------------------------------------
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping, in every group of m consecutive entries of the last axis, the n best.

    Ranking: descending score, lower index first among equals, NaN above everything.
    """
    k = scores.shape[-1]
    if m < 1 or n < 0 or n > m:
        raise NmOnnxError(f"bad N:M = {n}:{m}")
    if k % m != 0:
        raise NmOnnxError(f"the reduction size K={k} is not a multiple of M={m}")
    g = scores.reshape(*scores.shape[:-1], k // m, m)
    # torch's stable descending sort puts NaN first and keeps index order among equal keys.
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(g.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(scores.shape)


def nm_prune(x: torch.Tensor, n: int, m: int, score: torch.Tensor | None = None) -> torch.Tensor:
    """x with all but the n best of every m consecutive entries (by `score`, default |x|) set to 0."""
    if score is None:
        score = x.detach().abs()
    mask = nm_mask(score, n, m)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----- criteria ------------------------------------------------------------------------------------
def clact_column_norms(x: torch.Tensor) -> torch.Tensor:
    """||X[:, j]||_2 over every token of the call (all leading axes flattened), float32 sums."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.sqrt((flat * flat).sum(dim=0))


def selection_scores(
    x: torch.Tensor, criterion: str = "magnitude", channel_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores s[..., K] used for ranking (never for the kept values).

    magnitude |x|; amber/wanda |x| * f (f = channel_scale); clact |x| * ||X[:, j]||_2 with column
    norms over all tokens of this call (the per-row factor of the CLACT paper is constant inside a
    group and is omitted: same ranking up to float rounding). clact therefore depends on the batch
    and the sequence length, and equals magnitude ranking for a single token.
    """
    a = x.abs()
    if criterion == "magnitude":
        return a
    if criterion in CHANNEL_FACTOR_CRITERIA:
        if channel_scale is None:
            raise NmOnnxError(f"criterion '{criterion}' needs per-channel factors (channel_scale)")
        return a * channel_scale.to(a.dtype)
    if criterion == "clact":
        return a * clact_column_norms(x)
    raise NmOnnxError(f"unknown criterion '{criterion}'")


# ----- shifts and variance correction ----------------------------------------------------------------
def token_median(x: torch.Tensor) -> torch.Tensor:
    """Per-token lower median over the last axis, shape [..., 1]; NaN if the row holds a NaN."""
    return torch.median(x, dim=-1, keepdim=True).values


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-token mean over the last axis, shape [..., 1]."""
    return x.mean(dim=-1, keepdim=True)


def variance_scale(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """v_t = sqrt(Var(x_t) / max(Var(x_hat_t), 1e-9)), unbiased variances, shape [..., 1]."""
    vx = torch.var(x, dim=-1, keepdim=True)
    vh = torch.var(x_hat, dim=-1, keepdim=True)
    return torch.sqrt(vx / torch.clamp(vh, min=VAR_EPS))


# ----- the full sparse linear ----------------------------------------------------------------------
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    n: int,
    m: int,
    criterion: str = "magnitude",
    shift: str = "none",
    variance_correction: bool = False,
    channel_scale: torch.Tensor | None = None,
    static_shift: torch.Tensor | None = None,
    learned_shift: torch.Tensor | None = None,
    scale_a: torch.Tensor | None = None,
    scale_b: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b with N:M activation sparsity and the recipe's mitigations, in deployable form.

    eta = per-token median/mean [..., 1], the static scalar, the learned vector s[K], or none (0);
    xh = P(x - eta) (ranking on the shifted row); z = xh W^T + eta W^T (= eta * r, r = W 1, for a
    per-token or static eta; = s W^T for the learned shift);
    variance correction: z *= v_t with x_hat = xh + eta;
    scale_shift: z = z * (1 + a) + b_out; finally the linear's own bias: y = z + bias.
    For unstructured sparsity pass m = K and n = number kept. `mask` (bool, x's shape) forces the
    selection instead of computing it (validate's teacher-forced check: the masks a deployed model
    chose, replayed through the reference).
    """
    k = x.shape[-1]
    if k % m != 0:
        raise NmOnnxError(f"K={k} is not a multiple of M={m}")
    if shift == "none":
        eta = None
    elif shift == "median":
        eta = token_median(x)
    elif shift == "mean":
        eta = token_mean(x)
    elif shift == "static":
        if static_shift is None:
            raise NmOnnxError("shift 'static' needs a calibrated static_shift (run `nm-onnx calibrate`)")
        eta = static_shift.reshape(()).to(x.dtype)
    elif shift == "learned":
        if learned_shift is None:
            raise NmOnnxError("shift 'learned' needs a learned_shift vector (run `nm-onnx calibrate`)")
        eta = learned_shift.to(x.dtype)
    else:
        raise NmOnnxError(f"unknown shift '{shift}'")

    xc = x if eta is None else x - eta
    if mask is None:
        with torch.no_grad():
            mask = nm_mask(selection_scores(xc.detach(), criterion, channel_scale), n, m)
    elif mask.shape != x.shape:
        raise NmOnnxError(f"forced mask has shape {tuple(mask.shape)}, the input {tuple(x.shape)}")
    xh = torch.where(mask, xc, torch.zeros((), dtype=xc.dtype, device=xc.device))
    z = torch.nn.functional.linear(xh, weight)
    if eta is not None:
        if shift == "learned":
            z = z + torch.nn.functional.linear(eta, weight)  # s W^T, a constant [O]
        else:
            z = z + eta * weight.sum(dim=1)  # eta * r, r = W 1
    if variance_correction:
        x_hat = xh if eta is None else xh + eta
        z = z * variance_scale(x, x_hat)
    if scale_a is not None:
        z = z * (1 + scale_a.to(z.dtype))
    if scale_b is not None:
        z = z + scale_b.to(z.dtype)
    if bias is not None:
        z = z + bias
    return z
