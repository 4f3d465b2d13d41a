"""`transform`: rewrite an exported dense model into an N:M-activation-sparse one (library function).

Accepts a model file or an optimum export directory. A directory in gives a directory out that
optimum's ORTModelForCausalLM still loads (config and tokenizer files are copied; register the op
library through session options). External weights stay external and are streamed to the output;
outputs over 2 GB always use external data; the output appears atomically, so an error never leaves
a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nm_onnx.errors import NmOnnxError
from nm_onnx.passes.pipeline import PassReport, run_pipeline

EXTERNAL_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph
_MODEL_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data", ".data")


@dataclass
class TransformReport:
    input: str
    output: str
    recipe: str
    fuse: bool
    portable: bool
    external_data: bool
    seconds: float
    passes: PassReport = field(default_factory=PassReport)

    def table(self) -> str:
        head = (f"transform {self.input} -> {self.output}\nrecipe {self.recipe}"
                f"{'' if self.fuse else ' (unfused)'}{' (portable)' if self.portable else ''}")
        return f"{head}\n{self.passes.table()}\n{self.seconds:.1f} s"

    def to_dict(self) -> dict:
        return {
            "input": self.input, "output": self.output, "recipe": self.recipe, "fuse": self.fuse,
            "portable": self.portable, "external_data": self.external_data, "seconds": self.seconds,
            "sites": self.passes.sites, "fused": self.passes.fused,
        }


def _load_calibration(calibration):
    if calibration is None or hasattr(calibration, "constants"):
        return calibration
    from nm_onnx.calibration import load_artifact

    return load_artifact(calibration)


def _has_external(model) -> bool:
    import onnx_ir as ir

    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model, out_file: Path, external: bool) -> None:
    """Write model (+ `<name>_data` when external) so the model file appears last, atomically."""
    import onnx_ir as ir

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{out_file.name}_data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.tmp-", dir=out_file.parent))
    try:
        ir.save(model, tmp / out_file.name, external_data=data_name if external else None)
        if external:
            os.replace(tmp / data_name, out_file.parent / data_name)
        os.replace(tmp / out_file.name, out_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def transform(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    recipe,
    calibration=None,
    fuse: bool = True,
    portable: bool = False,
) -> TransformReport:
    """Transform IN (model file or export dir) into OUT with RECIPE (preset, JSON path or object)."""
    from nm_onnx.graph.load import load_model, model_file
    from nm_onnx.recipe import SparsityRecipe

    start = time.perf_counter()
    recipe = SparsityRecipe.load(recipe)
    artifact = _load_calibration(calibration)
    src = model_file(in_path)
    out = Path(out_path)
    as_dir = Path(in_path).is_dir()
    if not as_dir and out.is_dir():
        raise NmOnnxError(f"output '{out}' is a directory; give a .onnx file name for a model-file input")
    if as_dir and out.exists() and not out.is_dir():
        raise NmOnnxError(f"output '{out}' exists and is not a directory (the input is an export directory)")
    if out.resolve() in (Path(in_path).resolve(), src.resolve()):
        raise NmOnnxError("output must differ from the input; transform writes a new model")
    model = load_model(src)
    passes = run_pipeline(model, recipe, artifact, fuse=fuse, portable=portable)
    external = _has_external(model) or _weight_bytes(model) > EXTERNAL_THRESHOLD
    report = TransformReport(str(in_path), str(out), recipe.name, fuse, portable, external, 0.0, passes)
    if as_dir:
        from nm_onnx.io import atomic_dir

        with atomic_dir(out) as tmp:
            for f in sorted(Path(in_path).iterdir()):
                if f.is_file() and not f.name.endswith(_MODEL_SUFFIXES) and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            save_model(model, tmp / src.name, external)
            report.seconds = time.perf_counter() - start
            (tmp / "nm_onnx_transform.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        save_model(model, out, external)
    report.seconds = time.perf_counter() - start
    return report


def print_report(report: TransformReport) -> None:
    print(report.table(), file=sys.stdout)
