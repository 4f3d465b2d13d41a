"""`nm-onnx inspect MODEL.onnx`: list the linear sites (module path, kind, K, O, node, weight)."""

import json
from collections import Counter

from nm_onnx.graph import find_linear_sites, load_model

NAME = "inspect"
HELP = "List the linear sites of an exported ONNX model (the site map used by calibration and passes)."


def add_arguments(p):
    p.add_argument("model", help="an .onnx file or an export directory")
    p.add_argument("--json", action="store_true", help="print the site map as JSON")


def run(args) -> int:
    sites = find_linear_sites(load_model(args.model))
    if args.json:
        print(json.dumps([s.to_dict() for s in sites], indent=2))
        return 0
    header = f"{'module':<40} {'kind':<8} {'K':>6} {'O':>6} {'dtype':<8} {'weight':<28} matmul"
    print(header)
    print("-" * len(header))
    for s in sites:
        weight = s.weight + (" (W, transposed)" if s.transposed else "")
        print(f"{s.module:<40} {s.kind:<8} {s.k:>6} {s.o:>6} {s.dtype:<8} {weight:<28} {s.matmul}")
    counts = Counter(s.kind for s in sites)
    print(f"\n{len(sites)} linear sites: " + ", ".join(f"{k}={counts[k]}" for k in sorted(counts)))
    return 0
