"""`nm-onnx bench MODEL [--baseline DENSE]`: the CLI of nm_onnx.bench (prefill/decode tok/s, profiles)."""

from __future__ import annotations

import json
import sys

from nm_onnx.commands._args import non_negative, positive

NAME = "bench"
HELP = "Prefill/decode tokens/s of an ONNX model (and a dense baseline), interleaved, with ORT's per-op profile."


def add_arguments(p):
    p.add_argument("model", help="an .onnx file or export directory (usually the sparse model)")
    p.add_argument("--baseline", default=None, help="dense model to compare against (same interface)")
    p.add_argument("--prompt", type=positive, default=512, help="prompt tokens for prefill (default 512)")
    p.add_argument("--decode", type=non_negative, default=64, help="decode steps of one token (default 64; 0 = skip)")
    p.add_argument("--repeats", type=positive, default=3, help="interleaved timed repeats (default 3)")
    p.add_argument("--warmup", type=non_negative, default=1, help="untimed warm-up rounds (default 1)")
    p.add_argument("--threads", type=positive, default=None, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--top", type=non_negative, default=10, help="ops shown in each profile (0 = no profile)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    def progress(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    from nm_onnx.bench import bench, bench_markdown

    res = bench(args.model, args.baseline, args.prompt, args.decode, args.repeats, args.warmup,
                args.threads, args.top, progress)
    print(json.dumps(res, indent=2) if args.json else bench_markdown(res))
    return 0
