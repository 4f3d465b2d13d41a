"""Perplexity of a PyTorch causal LM over fixed token windows (the "torch twin" of the ONNX eval).

Thin adapter over `nm_onnx.evaluation.perplexity`, so the PyTorch simulation and the ONNX evaluation
score windows with literally the same code (same float64 log-softmax, same token count). Protocol
(the paper's): each window is scored independently, no BOS is added, every position but the first
predicts the next token; perplexity = exp(total NLL / predicted tokens). `PerplexityResult.nll` is
the mean NLL per predicted token (nats).
"""

from __future__ import annotations

import numpy as np

from nm_onnx.evaluation.perplexity import PerplexityResult
from nm_onnx.evaluation.perplexity import perplexity_torch as _evaluation_perplexity_torch

__all__ = ["PerplexityResult", "nll_torch", "perplexity_torch"]


def nll_torch(model, windows, progress: bool = False) -> PerplexityResult:
    """Perplexity result of `model` (eval mode for the call) on `windows` ([n, L] token ids)."""
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2:
        windows = windows.reshape(-1, windows.shape[-1])
    was_training = model.training
    model.eval()
    try:
        return _evaluation_perplexity_torch(model, windows, progress=progress)
    finally:
        model.train(was_training)


def perplexity_torch(model, windows, progress: bool = False) -> float:
    """Perplexity of `model` on `windows` ([n, L] token ids): exp(mean next-token NLL)."""
    return nll_torch(model, windows, progress).perplexity
