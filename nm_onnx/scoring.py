"""Scoring of token windows (numpy, no torch): the one definition ORT and PyTorch perplexities share.

A window of L tokens predicts its tokens 1..L-1 from their prefixes; its NLL is computed with a
float64 log-softmax as soon as its logits exist (the logits are then dropped: a 262k-token
vocabulary makes many windows' logits tens of GB); perplexity = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    lg = np.asarray(logits, dtype=np.float64)
    mx = lg.max(axis=-1, keepdims=True)
    return lg - (np.log(np.exp(lg - mx).sum(axis=-1, keepdims=True)) + mx)


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of NLL of ids[:, 1:] under logits[:, :-1] (float64 log-softmax), and the token count."""
    lg = np.asarray(logits[:, :-1, :], dtype=np.float64)
    tgt = ids[:, 1:]
    mx = lg.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(axis=-1)) + mx[..., 0]
    picked = np.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    return float((lse - picked).sum()), int(tgt.size)


class WindowScores:
    """Accumulates window NLLs into a PerplexityResult."""

    def __init__(self):
        self.total, self.count, self.per_window = 0.0, 0, []

    def add(self, logits: np.ndarray, window: np.ndarray) -> None:
        s, c = window_nll(logits, window[None, :])
        self.total += s
        self.count += c
        self.per_window.append(s / max(c, 1))

    def result(self, windows: np.ndarray) -> PerplexityResult:
        nll = self.total / max(self.count, 1)
        return PerplexityResult(math.exp(nll), nll, self.count, int(windows.shape[0]), int(windows.shape[1]),
                                self.per_window)
