"""Input feeds for optimum causal-LM exports, with or without KV cache.

Given token ids [B, T] it fills every graph input an optimum export declares: input_ids,
attention_mask (ones), position_ids (0..T-1 after the past), and past_key_values.* (empty past, or the
`present.*` outputs of the previous step when decoding). ORT GenAI graphs take the same names but
leave the KV cache's head axis symbolic: its size comes from the session (`nm_onnx_head_size`, read
by nm_onnx.runtime.make_session from genai_config.json).
"""

from __future__ import annotations

import numpy as np

_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def has_kv_cache(session) -> bool:
    return any(i.name.startswith("past_key_values") for i in session.get_inputs())


def is_genai(session) -> bool:
    """True for an ORT GenAI graph (nm_onnx.runtime.make_session read its genai_config.json)."""
    return getattr(session, "nm_onnx_head_size", None) is not None


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    past = {}
    head = getattr(session, "nm_onnx_head_size", None)
    for i in session.get_inputs():
        if not i.name.startswith("past_key_values"):
            continue
        dims = []
        for axis, d in enumerate(i.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            elif axis == len(i.shape) - 1 and head:
                dims.append(head)  # GenAI: [batch, kv_heads, past, kv_cache_dim]
            else:
                dims.append(0)  # the past sequence axis
        past[i.name] = np.zeros(dims, dtype=_ORT_TO_NP.get(i.type, np.float32))
    return past


def make_feed(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, past_len: int = 0):
    """Feed dict for one forward call on `ids` [B, T] after `past_len` cached tokens."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    b, t = ids.shape
    names = {i.name for i in session.get_inputs()}
    feed: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((b, past_len + t), dtype=np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
    if has_kv_cache(session):
        feed.update(past if past is not None else empty_past(session, b))
    return feed


def present_names(session) -> list[str]:
    """The `present.N.key/value` outputs (a caller that needs only the KV cache can fetch just these)."""
    return [o.name for o in session.get_outputs() if o.name.startswith("present")]


def present_to_past(session, outputs: list[np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Map `present.N.key/value` outputs to the `past_key_values.N.key/value` inputs of the next step.

    `outputs` are the session's outputs in order, or those of `names` when given."""
    names = names if names is not None else [o.name for o in session.get_outputs()]
    return {
        n.replace("present", "past_key_values", 1): v
        for n, v in zip(names, outputs)
        if n.startswith("present")
    }
