"""Perplexity of a PyTorch causal LM over fixed token windows (the "torch twin" of the ONNX eval).

Protocol (the paper's): each window is scored independently, no BOS is added, every position but
the first predicts the next token; perplexity = exp(total NLL / total predicted tokens). Each
window's NLL is reduced as soon as its logits exist (never keep many windows of logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # total negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int


@torch.inference_mode()
def nll_torch(model, windows, progress: bool = False) -> PerplexityResult:
    """Total NLL of `windows` ([n, L] token ids, numpy or torch) under `model`."""
    windows = np.asarray(windows)
    total, count = 0.0, 0
    it = range(len(windows))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="perplexity", unit="window")
    was_training = model.training
    model.eval()
    try:
        for i in it:
            ids = torch.as_tensor(windows[i], dtype=torch.long).reshape(1, -1)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll.double())
            count += ids.shape[1] - 1
    finally:
        model.train(was_training)
    ppl = math.exp(total / count) if count else float("nan")
    return PerplexityResult(perplexity=ppl, nll=total, tokens=count, windows=len(windows))


def perplexity_torch(model, windows, progress: bool = False) -> float:
    """Perplexity of `model` on `windows` ([n, L] token ids): exp(mean next-token NLL)."""
    return nll_torch(model, windows, progress).perplexity
