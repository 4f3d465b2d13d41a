"""The layering of nm_onnx (docs/ARCHITECTURE.md): the deployed path never imports torch or lm-eval.

Two contracts: statically, no module of the torch-free core imports (at any depth, lazily or not)
torch, the PyTorch reference, the layer-wise fitting, validate or the CLI (nm_onnx.calibration's
package file is left out: it reaches the fitting code only through a lazy attribute, which the
dynamic test covers); dynamically, a real transform (with a calibration artifact and Amber factors)
runs in a fresh interpreter without loading torch, transformers or lm_eval, and a perplexity-only
evaluation without lm_eval (transformers, which tokenizes, itself imports torch when it is
installed).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models_cache import tiny_export

from nm_onnx import ops

ROOT = Path(__file__).resolve().parent.parent / "nm_onnx"
CORE = [
    "errors.py", "io.py", "genai.py", "method.py", "scoring.py", "recipe.py", "progress.py", "data.py", "runtime.py",
    "transform.py", "bench.py", "evaluate.py", "graph", "ops", "passes", "calibration/artifact.py", "evaluation/feeds.py", "evaluation/perplexity.py", "evaluation/latency.py",
    "evaluation/report.py", "evaluation/tokenizer.py", "evaluation/tasks.py",
    "autotune/__init__.py", "autotune/spec.py", "autotune/speed.py", "autotune/allocate.py", "autotune/verify.py",
    "autotune/report.py",
]
FORBIDDEN = ("torch", "nm_onnx.reference", "nm_onnx.calibration.layerwise", "nm_onnx.validate",
             "nm_onnx.commands", "nm_onnx.cli", "optimum")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _core_files():
    for entry in CORE:
        p = ROOT / entry
        yield from sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("path", list(_core_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_imports_nothing_from_the_torch_side(path):
    bad = sorted({m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)})
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _fresh(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_of_transform_and_runtime_loads_no_torch():
    got = _fresh("import json, sys, nm_onnx.transform, nm_onnx.runtime, nm_onnx.calibration, nm_onnx.evaluate\n"
                 "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'lm_eval')}))")
    assert got == {"torch": False, "transformers": False, "lm_eval": False}


def test_running_a_model_loads_no_graph_rewriter():
    """Sessions and evaluation need neither onnxscript (fuse's rewriter, --portable bodies) nor torch."""
    got = _fresh("import json, sys, nm_onnx.runtime, nm_onnx.evaluate\n"
                 "print(json.dumps({m: m in sys.modules for m in ('torch', 'onnxscript')}))")
    assert got == {"torch": False, "onnxscript": False}


@pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")
def test_transform_with_calibration_and_perplexity_run_without_torch(tmp_path):
    from nm_onnx.calibration.artifact import CalibrationArtifact
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.recipe import SparsityRecipe

    dense = tiny_export("llama")
    sites = [s for s in find_linear_sites(load_model(dense)) if s.kind != "lm_head"]
    recipe = SparsityRecipe(name="amber-static", pattern="8:16", criterion="amber", shift="static").validate()
    art = CalibrationArtifact(recipe, {f"{s.module}.static_shift": np.full(1, 0.01, np.float32) for s in sites},
                              report={"sites": {s.module: [s.k, s.o] for s in sites}, "model": "tiny-llama"})
    art.save(tmp_path / "cal")
    code = f"""
import json, sys
from nm_onnx.cli import main
rc1 = main(["transform", {str(dense)!r}, {str(tmp_path / 'sparse')!r}, "--recipe", {str(tmp_path / 'cal')!r},
            "--calibration", {str(tmp_path / 'cal')!r}])
after_transform = [m in sys.modules for m in ("torch", "transformers", "lm_eval")]
rc2 = main(["evaluate", {str(tmp_path / 'sparse')!r}, "--seqlen", "64", "--limit", "1", "--json"])
print(json.dumps({{"rc": [rc1, rc2], "after_transform": after_transform, "lm_eval": "lm_eval" in sys.modules}}))
"""
    assert _fresh(code) == {"rc": [0, 0], "after_transform": [False, False, False], "lm_eval": False}
