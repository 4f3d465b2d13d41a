"""Perplexity over non-overlapping windows (the paper's protocol), through ORT or PyTorch.

Each window of `seqlen` tokens is one forward pass; the model predicts tokens 1..seqlen-1 of the
window from their prefixes; perplexity = exp(total NLL / predicted tokens). The NLL of a window is
computed as soon as its logits exist and the logits are dropped (a large vocabulary would otherwise
need tens of GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from nm_onnx.evaluation.feeds import make_feed


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    window_nll: list[float] = field(default_factory=list, repr=False)  # mean NLL of each window

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "window_nll"}


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of NLL of ids[:, 1:] under logits[:, :-1] (float64 log-softmax), and the token count."""
    lg = np.asarray(logits[:, :-1, :], dtype=np.float64)
    tgt = ids[:, 1:]
    mx = lg.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(axis=-1)) + mx[..., 0]
    picked = np.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    return float((lse - picked).sum()), int(tgt.size)


def _result(total: float, count: int, windows: np.ndarray, per_window: list[float]) -> PerplexityResult:
    nll = total / max(count, 1)
    return PerplexityResult(math.exp(nll), nll, count, int(windows.shape[0]), int(windows.shape[1]), per_window)


def perplexity_onnx(session, windows: np.ndarray, desc: str = "perplexity (ORT)", progress=True):
    total, count, per = 0.0, 0, []
    out_names = [o.name for o in session.get_outputs()]
    li = out_names.index("logits")
    for w in tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False):
        logits = session.run([out_names[li]], make_feed(session, w[None, :]))[0]
        s, c = window_nll(logits, w[None, :])
        total += s
        count += c
        per.append(s / max(c, 1))
    return _result(total, count, windows, per)


def perplexity_torch(model, windows: np.ndarray, desc: str = "perplexity (torch)", progress=True):
    import torch

    total, count, per = 0.0, 0, []
    with torch.inference_mode():
        for w in tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False):
            ids = torch.from_numpy(np.asarray(w[None, :], dtype=np.int64))
            logits = model(input_ids=ids, use_cache=False).logits
            s, c = window_nll(logits.float().numpy(), w[None, :])
            total += s
            count += c
            per.append(s / max(c, 1))
    return _result(total, count, windows, per)
