"""Perplexity of an ONNX causal LM through ONNX Runtime over non-overlapping windows (the paper's protocol).

Windows come from `nm_onnx.data` (with the model's BOS convention); each window is one forward pass
and is scored by `nm_onnx.scoring` as soon as its logits exist, exactly as the PyTorch twin
(`nm_onnx.reference.perplexity`) scores its windows.
"""

from __future__ import annotations

import numpy as np

from nm_onnx.evaluation.feeds import make_feed
from nm_onnx.progress import progress as _progress
from nm_onnx.scoring import PerplexityResult, WindowScores

__all__ = ["PerplexityResult", "perplexity_onnx"]


def perplexity_onnx(session, windows: np.ndarray, desc: str = "perplexity (ORT)", progress=True) -> PerplexityResult:
    scores = WindowScores()
    out_names = [o.name for o in session.get_outputs()]
    logits_name = out_names[out_names.index("logits")]
    for w in _progress(windows, desc, progress, unit="win"):
        scores.add(session.run([logits_name], make_feed(session, w[None, :]))[0], w)
    return scores.result(windows)
