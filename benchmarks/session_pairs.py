"""Decode (and prefill) speedup of one sparse model over its dense baseline, measured on several fresh
session pairs in one process: how much a single two-thread measurement can be trusted.

Each pair: new dense and sparse sessions (nm_onnx.runtime.make_session), then
nm_onnx.evaluation.latency.measure (prompt, decode steps, interleaved repeats, 1 warm-up) and the
median pair ratios. One line per pair: speedups and both decode tok/s. benchmarks/RESULTS.md,
"Two-thread decode variance", holds the last results.

    .venv/bin/python benchmarks/session_pairs.py DENSE_DIR SPARSE_DIR [--threads 2] [--pairs 5]
        [--allow-spinning 0|1] [--torch-after-first]
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense")
    ap.add_argument("sparse")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--allow-spinning", choices=("0", "1"), default=None,
                    help="session.intra_op.allow_spinning of both sessions (default: ORT's, spinning on)")
    ap.add_argument("--torch-after-first", action="store_true",
                    help="run one PyTorch forward of SmolLM2-135M after the first pair (torch in the process)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from nm_onnx.evaluation.latency import measure, paired_speedup
    from nm_onnx.runtime import make_session

    if args.allow_spinning is not None:  # make_session builds its own SessionOptions: set the entry on all
        base = ort.SessionOptions

        class Options(base):
            def __init__(self):
                super().__init__()
                self.add_session_config_entry("session.intra_op.allow_spinning", args.allow_spinning)

        ort.SessionOptions = Options
    for i in range(args.pairs):
        r = measure({"dense": make_session(args.dense, threads=args.threads),
                     "sparse": make_session(args.sparse, threads=args.threads)},
                    args.prompt, args.decode, args.repeats, 1)
        s = paired_speedup(r["sparse"], r["dense"])
        print(f"pair {i + 1}: decode {s['decode_speedup']:.3f}x prefill {s['prefill_speedup']:.3f}x "
              f"dense {r['dense']['decode_tok_s']:.1f} tok/s sparse {r['sparse']['decode_tok_s']:.1f} tok/s",
              flush=True)
        if i == 0 and args.torch_after_first:
            import numpy as np

            from nm_onnx.models import load_hf_model, resolve_model
            from nm_onnx.reference.perplexity import nll_torch

            model, _ = load_hf_model(resolve_model("smollm2-135m"))
            nll_torch(model, np.random.default_rng(0).integers(0, 1000, (1, 512)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
