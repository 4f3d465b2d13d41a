"""`transform`: rewrite an exported dense model into an N:M-activation-sparse one (library function).

Accepts a model file, an optimum export directory or an ORT GenAI directory. A directory in gives a
directory out that optimum's ORTModelForCausalLM still loads (config and tokenizer files are copied;
register the op library through session options); a GenAI directory out also carries a copy of the
op library, named in its genai_config.json, so `og.Model(dir)` runs our kernels (nm_onnx.genai).
External weights stay external: they are copied to the output
on a background thread while the passes run (nm_onnx.graph.save); outputs over 2 GB always use
external data; the output appears atomically and is checked against the inputs and existing
folders before the work starts (nm_onnx.io), so an error never leaves a half-written model and a
path mistake never replaces a user's data.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.save import EXTERNAL_THRESHOLD, Prewrite, has_external, save_model, weight_bytes
from nm_onnx.io import MANIFEST
from nm_onnx.passes.pipeline import PassReport, run_pipeline

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
            "sites": self.passes.sites, "fused": self.passes.fused, "records": self.passes.records,
            "packed": self.passes.packed,  # selection group -> "packed" or why not (share_selection)
            "dispatch": self.passes.dispatch,  # {rows, sites[, reason]} with --prefill-dispatch, else {}
        }


def _load_calibration(calibration):
    if calibration is None or hasattr(calibration, "constants"):
        return calibration
    from nm_onnx.calibration import load_artifact

    return load_artifact(calibration)


def is_nm_onnx_model(path) -> bool:
    """True for an ONNX file that nm-onnx's transform wrote (its metadata says so)."""
    from nm_onnx.graph.load import read_proto

    meta = {p.key for p in read_proto(path, check_external=False).metadata_props}
    return "nm_onnx.version" in meta


def _data_files(src: Path) -> list[Path]:
    """The external-data files a model file refers to."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from nm_onnx.graph.load import read_proto

    proto = read_proto(src, check_external=False)
    return sorted({src.parent / ExternalDataInfo(t).location for t in proto.graph.initializer
                   if uses_external_data(t)})


def source_model(in_path) -> Path:
    """The model file of IN: the file itself, a GenAI directory's decoder, or an export's model.onnx."""
    from nm_onnx import genai
    from nm_onnx.graph.load import model_file

    return genai.decoder_file(in_path) if genai.is_genai_dir(in_path) else model_file(in_path)


def check_transform_output(in_path, out_path, recipe_source=None, calibration=None, overwrite=False) -> None:
    """Refuse a bad output before any slow work (see nm_onnx.io): the input, inside it, over user files."""
    from nm_onnx.io import check_output_dir, check_output_file

    src = source_model(in_path)
    out = Path(out_path)
    inputs = [in_path, src, *_data_files(src)]
    for extra in (recipe_source, calibration):
        if isinstance(extra, (str, os.PathLike)) and Path(extra).exists():
            inputs.append(extra)
    if Path(in_path).is_dir():
        if out.exists() and not out.is_dir():
            raise NmOnnxError(f"output '{out}' exists and is not a directory (the input is an export directory)")
        check_output_dir(out, "transform", inputs, overwrite)
    else:
        if out.is_dir():
            raise NmOnnxError(f"output '{out}' is a directory; give a .onnx file name for a model-file input")
        check_output_file(out, inputs, overwrite, ours=is_nm_onnx_model,
                          companions=[out.with_name(f"{out.name}_data")])


def transform(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    recipe,
    calibration=None,
    fuse: bool = True,
    portable: bool = False,
    overwrite: bool = False,
    quantize: str | None = None,
    quant_block_size: int = 32,
    quant_symmetric: bool = True,
    prefill_dispatch: int | None = None,
) -> TransformReport:
    """Transform IN (model file or export dir) into OUT with RECIPE (preset, JSON path or object).

    `quantize` ("int4" / "int8"): quantize the float linear sites first (nm_onnx.passes.quantize:
    round-to-nearest, blocks of `quant_block_size` along K, symmetric unless `quant_symmetric=False`).
    `prefill_dispatch` (ROWS): above ROWS token rows each fused site runs ORT's dense MatMul on the masked
    activation (nm_onnx.passes.dispatch; costs a second, pre-packed copy of those weights in memory).

    OUT may not be, contain or lie inside IN (or the recipe / calibration given); an existing OUT is
    replaced only when it is an earlier nm-onnx transform output, or with `overwrite`.
    """
    from nm_onnx import genai
    from nm_onnx.graph.load import load_model
    from nm_onnx.passes.quantize import parse_quantize
    from nm_onnx.recipe import SparsityRecipe

    start = time.perf_counter()
    quant = parse_quantize(quantize, quant_block_size)
    check_dispatch(prefill_dispatch, fuse)
    recipe_source = recipe
    recipe = SparsityRecipe.load(recipe)
    check_transform_output(in_path, out_path, recipe_source, calibration, overwrite)
    is_genai = genai.is_genai_dir(in_path)
    library = _genai_library(in_path, portable) if is_genai else None  # config and library checked first
    artifact = _load_calibration(calibration)
    src = source_model(in_path)
    out = Path(out_path)
    as_dir = Path(in_path).is_dir()
    model = load_model(src)
    prewrite = None
    try:
        if has_external(model):  # copy the weights to the output while the passes run
            prewrite = Prewrite(model, out.parent)
        passes = run_pipeline(model, recipe, artifact, fuse=fuse, portable=portable,
                              quantize=(*quant, quant_symmetric) if quant else None, dispatch=prefill_dispatch)
        external = has_external(model) or weight_bytes(model) > EXTERNAL_THRESHOLD
        report = TransformReport(str(in_path), str(out), recipe.name, fuse, portable, external, 0.0, passes)
        _write_output(model, in_path, src, out, as_dir, external, prewrite, report, start, overwrite,
                      [in_path, recipe_source, calibration], library)
    finally:
        if prewrite is not None:
            prewrite.close()
    report.seconds = time.perf_counter() - start
    return report


def check_dispatch(rows, fuse: bool) -> None:
    """Refuse a --prefill-dispatch that cannot work, before any slow work."""
    if rows is None:
        return
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise NmOnnxError(f"--prefill-dispatch takes a number of token rows >= 1 (e.g. 2), got {rows!r}")
    if not fuse:
        raise NmOnnxError("--prefill-dispatch chooses between the fused NMSparseMatMul and its prefill form; "
                          "drop --no-fuse (an unfused model already runs ORT's MatMul at every length)")


def _genai_library(in_path, portable: bool) -> Path | None:
    """The op library a GenAI output carries (None: --portable without a built library); a missing
    library, or a config that already loads another one, fails here, before the slow work."""
    from nm_onnx import genai, ops

    if portable and not ops.library_available():
        return None
    library = Path(ops.library_path())
    genai.with_custom_ops_library(genai.read_config(in_path), library.name)
    return library


def _write_genai_config(src_dir, tmp: Path, library: Path | None) -> None:
    """Copy the op library beside the model and name it (bare file name) in genai_config.json."""
    from nm_onnx import genai

    cfg = genai.read_config(src_dir)
    if library is not None:
        shutil.copy2(library, tmp / library.name)
        cfg = genai.with_custom_ops_library(cfg, library.name)
    (tmp / genai.CONFIG).write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")


def _write_output(model, in_path, src: Path, out: Path, as_dir: bool, external: bool, prewrite, report, start,
                  overwrite: bool, inputs, genai_library: Path | None = None):
    if as_dir:
        from nm_onnx.io import atomic_dir

        given = [p for p in inputs if isinstance(p, (str, os.PathLike)) and Path(p).exists()]
        with atomic_dir(out, "transform", overwrite, inputs=given) as tmp:
            for f in sorted(Path(in_path).iterdir()):
                if (f.is_file() and not f.name.endswith(_MODEL_SUFFIXES) and not f.name.startswith(".")
                        and f.name != MANIFEST):
                    shutil.copy2(f, tmp / f.name)
            save_model(model, tmp / src.name, external, prewrite)
            from nm_onnx import genai

            if genai.is_genai_dir(in_path):
                _write_genai_config(in_path, tmp, genai_library)
            report.seconds = time.perf_counter() - start
            (tmp / "nm_onnx_transform.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        save_model(model, out, external, prewrite)


def print_report(report: TransformReport) -> None:
    print(report.table(), file=sys.stdout)
