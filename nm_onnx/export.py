"""Export a Hugging Face causal LM to ONNX with optimum (the pipeline's first arrow).

The output directory is a standard optimum export (model.onnx + config + tokenizer) that
`optimum.onnxruntime.ORTModelForCausalLM` loads. Two fixes are applied after optimum:
  * ir_version is lowered to the minimum the opset needs (onnx 1.23 writes IR 14, which the pinned
    onnxruntime refuses);
  * the export is validated by loading it in an ORT session before the directory appears.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nm_onnx.errors import NmOnnxError
from nm_onnx.io import atomic_dir
from nm_onnx.models import resolve_model

DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"


def fix_ir_version(path: Path) -> int:
    """Rewrite the model's ir_version to the lowest one its opset imports allow; returns it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    needed = max(needed, 8)
    if model.ir_version != needed:
        model.ir_version = needed
        onnx.save(model, str(path))  # external data references stay as they are
    return needed


def export(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    with_past: bool = True,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> Path:
    """Export MODEL (alias, HF dir or .gguf) to OUT_DIR; returns the path of model.onnx.

    OUT_DIR may not be, contain or lie inside the source; an existing OUT_DIR is replaced only when it
    is an earlier nm-onnx export (or with `overwrite`), checked before the slow work.
    """
    from nm_onnx.io import check_output_dir

    out_dir = Path(out_dir)
    given = [source] if Path(str(source)).exists() else []
    check_output_dir(out_dir, "export", given, overwrite)
    hf_dir = resolve_model(source)
    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if with_past else "text-generation"
    print(f"nm-onnx: exporting {source} ({task}, opset {opset}) ...", file=sys.stderr)
    with atomic_dir(out_dir, "export", overwrite, inputs=[*given, hf_dir]) as tmp:
        kwargs = {"output": str(tmp), "task": task, "opset": opset, "device": "cpu", "do_validation": False,
                  "local_files_only": True, "library_name": "transformers"}
        try:
            try:
                main_export(str(hf_dir), **kwargs)
            except RuntimeError as e:
                if "post-processing of the ONNX export failed" not in str(e):
                    raise
                # optimum's post-processing (deduplicating tied weights) loads the whole model into one
                # protobuf, which cannot exceed 2 GB: export again without it (tied weights stay separate)
                cause = e.__cause__ or e.__context__
                print(f"nm-onnx: optimum's post-processing failed ({type(cause).__name__}: "
                      f"{str(cause).splitlines()[0][:200] if cause else 'no cause given'}); exporting again "
                      "without it (a tied lm_head keeps its own copy of the weight)", file=sys.stderr)
                for f in tmp.iterdir():
                    if f.is_file():
                        f.unlink()
                main_export(str(hf_dir), **kwargs, no_post_process=True)
        except NmOnnxError:
            raise
        except Exception as e:  # optimum raises ValueError/KeyError/... for unsupported models
            raise NmOnnxError(f"optimum could not export {source}: {type(e).__name__}: {e}") from None
        model_path = tmp / MODEL_FILE
        if not model_path.is_file():
            raise NmOnnxError(f"optimum produced no {MODEL_FILE} for {source}")
        ir = fix_ir_version(model_path)
        _check_loads(model_path)
        (tmp / "nm_onnx_export.json").write_text(
            json.dumps({"source": str(source), "task": task, "opset": opset, "ir_version": ir}, indent=2)
        )
    return out_dir / MODEL_FILE


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise NmOnnxError(f"exported model does not load in onnxruntime: {e}") from None
