"""Resident memory of a loaded model: peak RSS of a fresh process that loads it and runs one short
generation (og.Generator for a GenAI directory, a plain ORT session otherwise), minus the same process's
RSS before loading. Shows what `--prefill-dispatch` costs: ORT's pre-packed copy of every dispatched
weight stays beside the weight our kernel reads.

    .venv/bin/python benchmarks/model_memory.py runs/g runs/g-8x16 runs/g-8x16-d2 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np
path, threads, genai = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
if genai:
    import onnxruntime_genai as og
    before = rss_kb()
    cfg = og.Config(path)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=40, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.arange(1, 33, dtype=np.int32)[None])  # 32 tokens: the prefill form
    for _ in range(4):
        gen.generate_next_token()
else:
    sys.path.insert(0, ".")
    from nm_onnx.evaluation.feeds import make_feed, present_to_past
    from nm_onnx.runtime import make_session
    import onnxruntime  # imported before the baseline reading, like og above
    before = rss_kb()
    sess = make_session(path, threads=threads)
    out = sess.run(None, make_feed(sess, np.arange(1, 33)[None]))
    out = sess.run(None, make_feed(sess, np.array([[5]]), present_to_past(sess, out), 32))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024, "after_mb": rss_kb() / 1024}))
"""


def measure(path: str, threads: int) -> dict:
    from nm_onnx import genai

    is_genai = genai.is_genai_dir(path)
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(threads), "1" if is_genai else "0"],
                       capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["model_mb"] = out["after_mb"] - out["before_mb"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    print("| model | RSS after load + generation MB | peak RSS MB |")
    print("|---|---|---|")
    for path in args.models:
        m = measure(path, args.threads)
        print(f"| {path} | {m['model_mb']:.0f} | {m['peak_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
