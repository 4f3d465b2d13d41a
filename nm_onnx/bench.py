"""`bench`: prefill and decode tokens/s of ONNX models in ORT, interleaved, with per-op and per-site profiles.

The model and its baseline are measured interleaved in one run (medians of the repeats; speedups
are medians of back-to-back pair ratios), then each gets an ORT per-op profile (top ops by time) and
the same kernel time split by linear-site kind (q, k, v, o, gate, up, down, lm_head, outside the
linear sites), the sites read from the record `transform` left in the model. Numbers are for this
machine and thread count; no test asserts them.
"""

from __future__ import annotations


def bench(model, baseline=None, prompt=512, decode=64, repeats=3, warmup=1, threads=None, top=10,
          progress=None) -> dict:
    """The result dict of `nm-onnx bench` (per model: times, tok/s, profiles; speedups vs the baseline)."""
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.evaluation.latency import (
        cpu_info,
        measure,
        paired_speedup,
        profile_events,
        site_kinds,
        summarize_profile,
        summarize_sites,
    )
    from nm_onnx.graph.load import read_proto
    from nm_onnx.models import check_context
    from nm_onnx.runtime import make_session, session_dir

    if repeats < 1:
        raise NmOnnxError(f"--repeats must be at least 1, got {repeats}")
    if decode < 0 or warmup < 0 or prompt < 1:
        raise NmOnnxError(f"--decode and --warmup must be >= 0 and --prompt >= 1, got {decode}, {warmup}, {prompt}")
    paths = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    protos = {name: read_proto(p) for name, p in paths.items()}  # corrupt files named first
    for p in paths.values():
        check_context(session_dir(p), prompt + decode, "--prompt + --decode")
    sessions = {name: make_session(p, threads=threads, proto=protos.pop(name)) for name, p in paths.items()}
    res = measure(sessions, prompt, decode, repeats, warmup, progress)
    out = {"machine": cpu_info(), "providers": sessions["model"].get_providers(), "prompt": prompt,
           "decode": decode, "repeats": repeats, "threads": threads,
           "results": {name: {"path": str(paths[name]), **r} for name, r in res.items()}}
    if baseline is not None:
        out.update(paired_speedup(res["model"], res["baseline"]))
    if top > 0:
        for name, p in paths.items():
            if progress:
                progress(f"profiling {name}")
            events = profile_events(p, prompt, min(decode, 8), threads)
            out["results"][name]["profile"] = summarize_profile(events, top)
            out["results"][name]["site_profile"] = summarize_sites(events, site_kinds(p))
    return out


def bench_markdown(res: dict) -> str:
    """The Markdown report of a bench result."""
    from nm_onnx.evaluation.report import markdown_table

    rows = []
    for name, r in res["results"].items():
        rows.append([name, r["path"], f"{r['prefill_tok_s']:.1f}",
                     f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "–"])
    lines = [(f"machine: {res['machine']}; providers {', '.join(res['providers'])}; prompt {res['prompt']} "
              f"tokens, decode {res['decode']} steps; medians of {res['repeats']} interleaved repeats"), "",
             markdown_table(["model", "path", "prefill tok/s", "decode tok/s"], rows)]
    if "prefill_speedup" in res:
        lines += ["", f"speedup vs baseline (median of paired repeats): prefill {res['prefill_speedup']:.2f}x"
                  + (f", decode {res['decode_speedup']:.2f}x" if "decode_speedup" in res else "")]
    for name, r in res["results"].items():
        if r.get("profile"):
            lines += ["", f"ORT per-op profile of {name} (top {len(r['profile'])} by time):", "",
                      markdown_table(["op", "ms", "calls", "share"],
                                     [[p["op"], f"{p['ms']:.2f}", p["calls"], f"{100 * p['share']:.1f}%"]
                                      for p in r["profile"]])]
        if r.get("site_profile"):
            lines += ["", f"Kernel time of {name} by linear-site kind (from the transform's site record):", "",
                      markdown_table(["sites", "ms", "share"],
                                     [[p["sites"], f"{p['ms']:.2f}", f"{100 * p['share']:.1f}%"]
                                      for p in r["site_profile"]])]
    return "\n".join(lines)
