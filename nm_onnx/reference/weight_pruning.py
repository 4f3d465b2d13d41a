"""Weight-pruning baselines at equal sparsity: magnitude N:M and Wanda N:M on the weights.

The paper's central comparison is activation pruning against weight pruning at the same sparsity.
Both baselines prune each output row of W[O, K] in groups of M consecutive input channels (the same
reduction-axis groups the activation mask uses), with the same stable tie rule:
  magnitude: score |W_ij|;  Wanda: score |W_ij| * ||X_j||_2, X = the layer's calibration inputs.
Wanda's input norms are collected in one pass over the *dense* model (the original Wanda prunes
block by block with pruned upstream inputs; the one-shot variant is simpler and documented).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import DEFAULT_TARGETS, SparsityRecipe, parse_pattern
from nm_onnx.reference.functional import nm_mask
from nm_onnx.reference.modules import linear_paths

METHODS = ("magnitude", "wanda")


def weight_mask(weight: torch.Tensor, pattern: str, input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask of W[O, K]: N of every M consecutive input channels per output row."""
    n, m, s = parse_pattern(pattern)
    k = weight.shape[1]
    if n is None:
        n, m = k - round(s * k), k
    score = weight.detach().abs().float()
    if input_norms is not None:
        score = score * input_norms.float()[None, :]
    return nm_mask(score, n, m)


@torch.no_grad()
def collect_input_norms(model: nn.Module, paths: list[str], calib_inputs) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token at the input of each listed linear (dense model)."""
    sums = {p: None for p in paths}
    hooks = []
    for p in paths:
        def hook(mod, args, p=p):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = (x.double() ** 2).sum(dim=0)
            sums[p] = s if sums[p] is None else sums[p] + s
        hooks.append(model.get_submodule(p).register_forward_pre_hook(hook))
    try:
        for ids in calib_inputs:
            ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(1, -1)
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.sqrt(s).float() for p, s in sums.items()}


@torch.no_grad()
def apply_weight_pruning(
    model: nn.Module,
    pattern: str,
    method: str = "magnitude",
    calib_inputs=None,
    targets: list[str] | None = None,
    exclude: list[str] | None = None,
) -> nn.Module:
    """Zero all but N of every M weights per output row of each targeted linear, in place.

    calib_inputs: iterable of token-id windows (needed by Wanda). Returns the model.
    """
    if method not in METHODS:
        raise NmOnnxError(f"unknown weight-pruning method '{method}'; choose {' or '.join(METHODS)}")
    sel = SparsityRecipe(name=f"weight-{method}", pattern=pattern, targets=list(targets or DEFAULT_TARGETS),
                         exclude=list(exclude or [])).validate()
    paths = sel.match(linear_paths(model))
    _, m, _ = parse_pattern(pattern)
    for p in paths:
        k = model.get_submodule(p).weight.shape[1]
        if m is not None and k % m != 0:
            raise NmOnnxError(f"pattern {pattern} does not fit {p}: K={k} is not a multiple of M={m}")
    norms = None
    if method == "wanda":
        if calib_inputs is None:
            raise NmOnnxError("Wanda weight pruning needs calibration inputs (calib_inputs)")
        norms = collect_input_norms(model, paths, calib_inputs)
    for p in paths:
        lin = model.get_submodule(p)
        mask = weight_mask(lin.weight, pattern, None if norms is None else norms[p])
        lin.weight.copy_(torch.where(mask, lin.weight, torch.zeros((), dtype=lin.weight.dtype)))
    return model
