"""`nm-onnx recipes`: list the named sparsity presets (or print one as JSON)."""

from __future__ import annotations

NAME = "recipes"
HELP = "List the named sparsity recipes (presets), or print one recipe as JSON."


def add_arguments(p):
    p.add_argument("name", nargs="?", help="print this preset (or recipe file) as JSON")


def run(args) -> int:
    from nm_onnx.recipe import PRESETS, SHARED_SUFFIX, SparsityRecipe

    if args.name:
        print(SparsityRecipe.load(args.name).to_json())
        return 0
    width = max(len(n) for n in PRESETS)
    for name, r in PRESETS.items():
        cal = "  (needs calibrate)" if r.needs_calibration else ""
        print(f"{name:<{width}}  {r.describe()}{cal}")
    print("\nTargets by default: q,k,v,o,gate,up,down projections of every decoder layer. "
          "Print one as JSON with `nm-onnx recipes NAME`, edit it, pass the file as --recipe.\n"
          f"NAME{SHARED_SUFFIX} (e.g. 8:16-amber{SHARED_SUFFIX}): the preset with share_selection: q/k/v and gate/up "
          "choose one mask per token, packed into one MatMul by transform (docs/method.md).")
    return 0
