"""The method's shared facts (METHOD.md), defined once and importable without torch.

Everything below the PyTorch reference needs some facts of the method: which calibration constants
exist and what shape they have, which ones a recipe needs, the variance floor, and the Amber /
Wanda per-channel factors (numpy, from the weight alone). The graph passes, the calibration
artifact, the op references and the PyTorch reference all import them from here, so the deployed
path (transform, runtime) never imports torch and no fact has two definitions.
"""

from __future__ import annotations

import numpy as np

from nm_onnx.errors import NmOnnxError

# Calibration constants, keyed `<module path>.<name>` in an artifact, and their shapes.
CONSTANT_NAMES = ("static_shift", "channel_scale", "learned_shift", "scale_a", "scale_b")
OUTPUT_CONSTANTS = ("scale_a", "scale_b")  # per output channel (a packed site: its projections' concatenated)
CHANNEL_FACTOR_CRITERIA = ("amber", "wanda")  # criteria whose ranking multiplies |x| by a constant f[K]
VAR_EPS = 1e-9  # floor of the pruned row's variance in the variance correction
CLACT_EPS = 1e-8  # CLACT's row-norm epsilon (constant within a group: it never changes a ranking)
AMBER_QUANTILES = (0.005, 0.995)  # Amber Pruner's trimming of the weight before its robust norm


def constant_shape(name: str, k: int, o: int) -> tuple[int, ...]:
    """Shape of calibration constant `name` at a site with K inputs and O outputs (static_shift: [1])."""
    shapes = {"static_shift": (1,), "channel_scale": (k,), "learned_shift": (k,), "scale_a": (o,), "scale_b": (o,)}
    if name not in shapes:
        raise NmOnnxError(f"unknown calibration constant '{name}'; known: {', '.join(CONSTANT_NAMES)}")
    return shapes[name]


def needed_constants(setting) -> list[str]:
    """The calibration constants a site cannot run without (static / learned shifts, scale_shift).

    `setting`: a site's `nm_onnx.recipe.SiteSetting` (or anything with shift, scale_shift, dense).
    """
    if getattr(setting, "dense", False):
        return []
    names = {"static": ["static_shift"], "learned": ["learned_shift"]}.get(setting.shift, [])
    return names + (["scale_a", "scale_b"] if setting.scale_shift else [])


def _as_f64(weight) -> np.ndarray:
    if hasattr(weight, "detach"):  # a torch tensor or parameter (duck-typed: no torch import here)
        weight = weight.detach().to("cpu").double().numpy()
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise NmOnnxError(f"expected a weight matrix [O, K], got shape {w.shape}")
    return w


def amber_factors(weight) -> np.ndarray:
    """Amber Pruner robust-norm channel factors f[K] of a weight W[O, K], exact and deterministic.

    W is trimmed to its [0.5%, 99.5%] quantiles (exact, linear interpolation, over all weights),
    mu/sigma = mean/std (ddof=1) of the weights inside that closed range, W_hat = (W - mu) / sigma,
    c_j = ||W_hat[:, j]||_2, f_j = c_j / min_k c_k. Computed in float64 with numpy, returned as
    float32. (sigma cancels in f; mu does not.)
    """
    w = _as_f64(weight)
    flat = w.ravel()
    lo, hi = np.quantile(flat, AMBER_QUANTILES)
    inside = flat[(flat >= lo) & (flat <= hi)]
    mu = inside.mean()
    sigma = inside.std(ddof=1) if inside.size > 1 else 1.0
    if not np.isfinite(sigma) or sigma == 0:
        sigma = 1.0
    w_hat = (w - mu) / sigma
    c = np.sqrt(np.sum(w_hat * w_hat, axis=0))
    cmin = c.min()
    if not cmin > 0:
        cmin = np.finfo(np.float64).tiny
    return (c / cmin).astype(np.float32)


def wanda_factors(weight) -> np.ndarray:
    """Wanda-like channel factors ||W[:, j]||_2 of W[O, K] (float64 math, float32 result)."""
    w = _as_f64(weight)
    return np.sqrt(np.sum(w * w, axis=0)).astype(np.float32)


def channel_factors(weight, criterion: str) -> np.ndarray:
    """Per-input-channel factor f[K] of a channel-factor criterion (amber | wanda), from W[O, K]."""
    if criterion == "amber":
        return amber_factors(weight)
    if criterion == "wanda":
        return wanda_factors(weight)
    raise NmOnnxError(f"criterion '{criterion}' has no channel factors (only {CHANNEL_FACTOR_CRITERIA})")
