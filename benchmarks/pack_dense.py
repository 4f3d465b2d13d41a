"""A DENSE model with transform's horizontal fusion (pack pass) and nothing else: q/k/v and gate/up of
every layer as one MatMul + Split. It separates what packing alone buys a dense model from what one
shared selection buys a sparse one (benchmarks/RESULTS.md, "Shared selection and packed sites").

    python benchmarks/pack_dense.py DENSE_EXPORT_DIR OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from nm_onnx.graph.load import load_model, model_file
from nm_onnx.graph.save import save_model
from nm_onnx.passes.common import PassReport
from nm_onnx.passes.pack import PackPass
from nm_onnx.recipe import SparsityRecipe


def main(src: str, out: str) -> None:
    src_dir, out_dir = Path(src), Path(out)
    if out_dir.exists():
        sys.exit(f"{out_dir} exists; give a new directory")
    model = load_model(model_file(src_dir))
    report = PassReport()
    PackPass(SparsityRecipe.load("8:16-magnitude+shared"), report)(model)  # groups of every layer
    out_dir.mkdir(parents=True)
    for f in src_dir.iterdir():  # config, tokenizer: what bench and the feeds read
        if f.is_file() and not f.name.startswith(("model.onnx", "nm_onnx_")):
            shutil.copy2(f, out_dir / f.name)
    save_model(model, out_dir / "model.onnx", external=True)
    print(f"{out_dir}: {sum(v == 'packed' for v in report.packed.values())} groups packed")


if __name__ == "__main__":
    main(*sys.argv[1:3])
