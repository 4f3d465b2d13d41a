"""Latency of ONNX causal LMs in ORT: prefill tokens/s, decode tokens/s, per-op profiles.

Prefill: one forward over a prompt of P tokens (empty KV cache). Decode: after a P-token prefill (not
timed), S forwards of one token each reusing the KV cache; tokens/s = S / time of those S calls.
Several models are measured interleaved (A, B, A, B, ...) so that machine noise hits them alike, and
each number is the median over repeats. The per-op profile comes from ORT's own profiling JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.feeds import has_kv_cache, make_feed, present_to_past


def prompt_ids(session, length: int, seed: int = 0) -> np.ndarray:
    """Random token ids [1, length] inside the model's vocabulary."""
    if length < 1:
        raise NmOnnxError(f"--prompt must be at least 1 token, got {length}")
    out = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = out.shape[-1] if isinstance(out.shape[-1], int) else None
    if vocab is None:
        vocab = session.run(["logits"], make_feed(session, np.zeros((1, 1), np.int64)))[0].shape[-1]
    return np.random.default_rng(seed).integers(0, vocab, size=(1, length), dtype=np.int64)


def time_prefill(session, ids: np.ndarray) -> float:
    """Seconds of one forward over ids [1, P]."""
    feed = make_feed(session, ids)
    t = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - t


def require_kv_cache(session, name: str) -> None:
    if not has_kv_cache(session):
        raise NmOnnxError(
            f"{name} has no KV cache (no past_key_values inputs), so decode speed cannot be measured; "
            "export it with the KV cache (`nm-onnx export`, the default) or pass --decode 0"
        )


def time_decode(session, ids: np.ndarray, steps: int) -> float:
    """Seconds of `steps` one-token forwards with the KV cache after a prefill of ids (not timed)."""
    outs = [o.name for o in session.get_outputs()]
    li = outs.index("logits")
    res = session.run(None, make_feed(session, ids))
    past, past_len = present_to_past(session, res), ids.shape[1]
    tok = np.argmax(res[li][:, -1:, :], axis=-1).astype(np.int64)
    t = time.perf_counter()
    for _ in range(steps):
        res = session.run(None, make_feed(session, tok, past, past_len))
        past, past_len = present_to_past(session, res), past_len + 1
        tok = np.argmax(res[li][:, -1:, :], axis=-1).astype(np.int64)
    return time.perf_counter() - t


def measure(sessions: dict, prompt: int, decode: int, repeats: int = 3, warmup: int = 1, progress=None) -> dict:
    """{name: {prefill_tok_s, decode_tok_s, prefill_s: [...], decode_s: [...]}}, interleaved, medians."""
    if decode > 0:
        for name, s in sessions.items():
            require_kv_cache(s, name)
    ids = prompt_ids(next(iter(sessions.values())), prompt)
    times = {n: {"prefill_s": [], "decode_s": []} for n in sessions}
    for r in range(warmup + repeats):
        for name, s in sessions.items():
            p = time_prefill(s, ids)
            d = time_decode(s, ids, decode) if decode > 0 else None
            if r >= warmup:
                times[name]["prefill_s"].append(p)
                if d is not None:
                    times[name]["decode_s"].append(d)
            if progress:
                progress(f"{'warm-up' if r < warmup else f'repeat {r - warmup + 1}/{repeats}'} {name}: "
                         f"prefill {p * 1e3:.1f} ms" + (f", decode {d * 1e3:.1f} ms" if d is not None else ""))
    out = {}
    for name, t in times.items():
        pre = statistics.median(t["prefill_s"])
        out[name] = {"prefill_tok_s": prompt / pre, "prefill_median_s": pre, **t}
        if t["decode_s"]:
            dec = statistics.median(t["decode_s"])
            out[name].update(decode_tok_s=decode / dec, decode_median_s=dec)
    return out


def paired_speedup(model: dict, baseline: dict) -> dict:
    """Speedups of `model` over `baseline` from one `measure` run: for prefill and decode, the median over
    repeats of baseline time / model time, each pair measured back to back (robust to slow drifts of the
    machine, e.g. memory bandwidth taken by neighbours, that a ratio of two medians is not)."""
    out = {}
    for phase in ("prefill", "decode"):
        a, b = model.get(f"{phase}_s") or [], baseline.get(f"{phase}_s") or []
        if a and len(a) == len(b):
            out[f"{phase}_speedup"] = statistics.median(tb / ta for ta, tb in zip(a, b))
    return out


def profile_events(path, prompt: int, decode: int, threads=None) -> list[dict]:
    """ORT's profiling events of one prefill (+ `decode` one-token steps) of the model at `path`."""
    from nm_onnx.runtime import make_session

    sess = make_session(path, threads=threads, profile=True)
    ids = prompt_ids(sess, prompt)
    if decode > 0 and has_kv_cache(sess):
        time_decode(sess, ids, decode)  # one prefill, then `decode` one-token steps
    else:
        time_prefill(sess, ids)
    prof = Path(sess.end_profiling())
    try:
        return json.loads(prof.read_text())
    finally:
        prof.unlink(missing_ok=True)


def op_profile(path, prompt: int, decode: int, threads=None, top: int = 10) -> list[dict]:
    """Top ops by total time from ORT's profiling JSON of one prefill (+ decode steps)."""
    return summarize_profile(profile_events(path, prompt, decode, threads), top)


CONTROL_FLOW = ("If", "Loop", "Scan")  # their kernel time is their subgraph's nodes' time, profiled too


def _kernel_events(events: list[dict]):
    for e in events:
        if (e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
                and e.get("args", {}).get("op_name") not in CONTROL_FLOW):
            yield e


def summarize_profile(events: list[dict], top: int = 10) -> list[dict]:
    """Aggregate ORT 'Node' kernel events by op type: total ms, calls, share of the node time."""
    tot: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in _kernel_events(events):
        op = e.get("args", {}).get("op_name", "?")
        tot[op] += float(e.get("dur", 0)) / 1e3
        calls[op] += 1
    total = sum(tot.values()) or 1.0
    rows = sorted(tot, key=tot.get, reverse=True)[:top]
    return [{"op": o, "ms": tot[o], "calls": calls[o], "share": tot[o] / total} for o in rows]


def site_kinds(path) -> dict[str, str]:
    """{node name: site kind} of a model's linear sites: the transform's site record of a sparse model
    (every node of a site, of both forms of a --prefill-dispatch model), the MatMul (+ bias Add) of
    each linear site of a dense one."""
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.passes.dispatch import dispatch_info, select_form
    from nm_onnx.passes.record import site_records

    model = load_model(path)
    out = {name: r["kind"] for r in site_records(model)
           for name in r["nodes"] + r.get("dispatch", {}).get("prefill", [])}
    if dispatch_info(model) is not None:  # the linears outside the sites (lm_head) sit in both branches
        select_form(model, "decode")
    recorded = set(out)
    for s in find_linear_sites(model):
        if s.matmul not in recorded:
            out[s.matmul] = s.kind
            if s.bias_add:
                out[s.bias_add] = s.kind
    return out


def summarize_sites(events: list[dict], kinds: dict[str, str]) -> list[dict]:
    """Kernel time per linear-site kind (q, k, ..., lm_head) and outside the linear sites."""
    tot: dict[str, float] = defaultdict(float)
    for e in _kernel_events(events):
        node = str(e["name"])[: -len("_kernel_time")]
        tot[kinds.get(node, "outside linear sites")] += float(e.get("dur", 0)) / 1e3
    total = sum(tot.values()) or 1.0
    order = [k for k in ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "other") if k in tot]
    order += [k for k in tot if k not in order]
    return [{"sites": k, "ms": tot[k], "share": tot[k] / total} for k in order]


def cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"
