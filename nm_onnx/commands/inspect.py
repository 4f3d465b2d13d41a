"""`nm-onnx inspect MODEL.onnx`: list the linear sites (module path, kind, K, O, node, weight).

On a model that `nm-onnx transform` wrote it says so and lists the sparsified sites from the record
the transform left in the model (nm_onnx.passes.record), then the linear sites that stayed dense.
"""

import json
from collections import Counter

from nm_onnx.graph import find_linear_sites, load_model

NAME = "inspect"
HELP = "List the linear sites of an exported ONNX model (the site map used by calibration and passes)."


def add_arguments(p):
    p.add_argument("model", help="an .onnx file or an export directory")
    p.add_argument("--json", action="store_true", help="print the site map as JSON")


def run(args) -> int:
    from nm_onnx.passes.common import pattern_counts
    from nm_onnx.passes.dispatch import dispatch_info, select_form
    from nm_onnx.passes.record import site_records

    model = load_model(args.model)
    records = site_records(model)
    dispatch = dispatch_info(model)
    if dispatch is not None:  # the dense linears (lm_head) sit inside the If: list those of one form
        select_form(model, "decode")
    in_records = {name for r in records for name in r["nodes"]}
    sites = [s for s in find_linear_sites(model) if s.matmul not in in_records]  # the unfused ones are sparse
    if args.json:
        out = [s.to_dict() for s in sites]
        print(json.dumps({"transformed": True, "recipe": json.loads(model.metadata_props.get("nm_onnx.recipe", "{}")),
                          "sparse_sites": records, "dense_sites": out, "dispatch": dispatch} if records else out,
                         indent=2))
        return 0
    if records:
        recipe = json.loads(model.metadata_props.get("nm_onnx.recipe", "{}"))
        fused = sum(r["fused"] for r in records)
        patterns = ", ".join(f"{p} x {c}" for p, c in pattern_counts(records).items())
        print(f"transformed by nm-onnx {model.metadata_props.get('nm_onnx.version', '?')}: recipe "
              f"{recipe.get('name', '?')} ({patterns}), {len(records)} sparse sites "
              f"({fused} fused); transform the dense export, not this model")
        if dispatch is not None:
            print(f"prefill dispatch: above {dispatch['rows']} token row(s) {dispatch['sites']} site(s) run ORT's "
                  "MatMul on the masked activation (the sites' prefill form)")
        print()
        header = f"{'sparse site':<40} {'kind':<8} {'K':>6} {'O':>6} {'op':<15} {'N:M':<6} input -> output"
        print(header)
        print("-" * len(header))
        for r in records:
            print(f"{r['module']:<40} {r['kind']:<8} {r['k']:>6} {r['o']:>6} {r['op']:<15} "
                  f"{r['n']}:{r['m']:<4} {r['input']} -> {r['output']}")
        print(f"\n{len(records)} sparse sites; the linear sites left dense:\n")
    header = f"{'module':<40} {'kind':<8} {'K':>6} {'O':>6} {'dtype':<8} {'weight':<28} matmul"
    print(header)
    print("-" * len(header))
    for s in sites:
        weight = s.weight + (" (W, transposed)" if s.transposed else "")
        print(f"{s.module:<40} {s.kind:<8} {s.k:>6} {s.o:>6} {s.dtype:<8} {weight:<28} {s.matmul}")
    counts = Counter(s.kind for s in sites)
    print(f"\n{len(sites)} {'dense ' if records else ''}linear sites: "
          + ", ".join(f"{k}={counts[k]}" for k in sorted(counts)))
    return 0
