"""PyTorch reference of METHOD.md: the oracle the ONNX path is checked against.

Public API:
  functional pieces: nm_mask, nm_prune, selection_scores, token_median, token_mean, variance_scale,
                     sparse_linear, channel_factors (amber / wanda), amber_factors, wanda_factors
  model level:       sparsify_model(model, recipe, artifact=None), unsparsify_model(model),
                     SparseLinear, apply_weight_pruning(model, pattern, method, calib_inputs)
  evaluation:        perplexity_torch(model, windows) -> float, nll_torch(...) -> PerplexityResult
                     (both reuse nm_onnx.evaluation.perplexity: one scoring code for torch and ORT)
"""

from nm_onnx.reference.functional import (
    amber_factors,
    channel_factors,
    clact_column_norms,
    nm_mask,
    nm_prune,
    selection_scores,
    sparse_linear,
    token_mean,
    token_median,
    variance_scale,
    wanda_factors,
)
from nm_onnx.reference.modules import (
    SparseLinear,
    decoder_layers,
    linear_paths,
    sparse_modules,
    sparsify_model,
    unsparsify_model,
)
from nm_onnx.reference.perplexity import PerplexityResult, nll_torch, perplexity_torch
from nm_onnx.reference.weight_pruning import apply_weight_pruning, collect_input_norms, weight_mask

__all__ = [
    "PerplexityResult",
    "SparseLinear",
    "amber_factors",
    "apply_weight_pruning",
    "channel_factors",
    "clact_column_norms",
    "collect_input_norms",
    "decoder_layers",
    "linear_paths",
    "nll_torch",
    "nm_mask",
    "nm_prune",
    "perplexity_torch",
    "selection_scores",
    "sparse_linear",
    "sparse_modules",
    "sparsify_model",
    "token_mean",
    "token_median",
    "unsparsify_model",
    "variance_scale",
    "wanda_factors",
    "weight_mask",
]
