"""Perplexity of a PyTorch causal LM over fixed token windows (the "torch twin" of the ONNX evaluation).

Scored by `nm_onnx.scoring`, the same code the ORT evaluation uses (same float64 log-softmax, same
token count): each window is scored independently, every position but the first predicts the next
token; perplexity = exp(total NLL / predicted tokens). Windows (and their BOS) come from
`nm_onnx.data`. `PerplexityResult.nll` is the mean NLL per predicted token (nats).
"""

from __future__ import annotations

import numpy as np
import torch

from nm_onnx.progress import progress as _progress
from nm_onnx.scoring import PerplexityResult, WindowScores

__all__ = ["PerplexityResult", "nll_torch", "perplexity_torch"]


def nll_torch(model, windows, progress: bool = False, desc: str = "perplexity (torch)") -> PerplexityResult:
    """Perplexity result of `model` (eval mode for the call) on `windows` ([n, L] token ids)."""
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2:
        windows = windows.reshape(-1, windows.shape[-1])
    was_training = model.training
    model.eval()
    scores = WindowScores()
    try:
        with torch.inference_mode():
            for w in _progress(windows, desc, progress, unit="win"):
                logits = model(input_ids=torch.from_numpy(w[None, :]), use_cache=False).logits
                scores.add(logits.float().numpy(), w)
    finally:
        model.train(was_training)
    return scores.result(windows)


def perplexity_torch(model, windows, progress: bool = False) -> float:
    """Perplexity of `model` on `windows` ([n, L] token ids): exp(mean next-token NLL)."""
    return nll_torch(model, windows, progress).perplexity
