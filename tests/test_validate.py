"""tools/validate.py: parity checks pass on a correct sparse model and fail, naming the check, on a
deliberately corrupted one (changed attribute n, changed baked constant)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models_cache import smollm2_export, tiny_export, tiny_hf
from onnx import numpy_helper

from nm_onnx import ops

pytestmark = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")
ROOT = Path(__file__).resolve().parent.parent
RECIPE = "8:16-median-variance"


def _validate(dense, sparse, model, *args):
    """tools/validate.py as a subprocess (the real entry point)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "validate.py"), str(dense), str(sparse), "--model", str(model),
         "--recipe", RECIPE, *args],
        check=False, capture_output=True, text=True, timeout=1200,
    )


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _validate_inproc(capsys, dense, sparse, model, *args):
    """Same CLI, in this process (saves the torch import of a subprocess)."""
    from nm_onnx.validate import main

    capsys.readouterr()
    rc = main([str(dense), str(sparse), "--model", str(model), "--recipe", RECIPE, *args])
    out = capsys.readouterr()
    return _Result(rc, out.out, out.err)


def _make_sparse(dense: Path, out: Path, fuse: bool = True) -> Path:
    """The real transform when it is importable, else the test stand-in (same fused op)."""
    try:
        from nm_onnx.transform import transform
    except ImportError:
        from sparse_fixture import hand_transform

        out.mkdir(parents=True)
        hand_transform(dense, out / "model.onnx")
        return out
    transform(dense, out, RECIPE, fuse=fuse)
    return out


@pytest.fixture(scope="module")
def tiny_sparse(tmp_path_factory):
    return _make_sparse(tiny_export("llama"), tmp_path_factory.mktemp("v") / "sparse")


def _corrupt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    edit(m)
    onnx.save(m, str(dst / "model.onnx"))
    return dst


def test_validate_passes_on_tiny_model(tiny_sparse, tmp_path):
    out = tmp_path / "report.json"
    r = _validate(tiny_export("llama"), tiny_sparse, tiny_hf("llama"), "--seqlen", "64", "--limit", "2",
                  "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["passed"] and rep["failed_checks"] == []
    checks = {c["check"]: c for c in rep["checks"]}
    assert set(checks) == {"a", "b", "c", "d", "e"}
    assert checks["b"]["details"]["sites"] == 14  # 2 layers x 7 projections
    assert all(s["mask_mismatches"] == 0 for s in checks["b"]["details"]["per_site"])
    assert checks["d"]["details"]["cases"] > 50
    c = checks["c"]["details"]  # ORT's masks replayed in PyTorch: logits agree like the dense check
    assert c["sites"] == 14 and c["max_abs_diff"] < 1e-3 and c["top1_agreement"] == 1.0
    e = checks["e"]["details"]  # paired per-window noise is reported next to the relative difference
    assert len(e["window_rel_diff"]) == 2 and e["rel_se"] >= 0
    for c in "abcd":
        assert f"PASS ({c})" in r.stdout
    assert checks["e"]["status"] in ("PASS", "INCONCLUSIVE")


def test_validate_unfused_form_passes(tmp_path, capsys):
    pytest.importorskip("nm_onnx.transform")
    sparse = _make_sparse(tiny_export("llama"), tmp_path / "unfused", fuse=False)
    r = _validate_inproc(capsys, tiny_export("llama"), sparse, tiny_hf("llama"), "--seqlen", "64", "--checks", "b")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "PASS (b)" in r.stdout


def _set_attr(model, op_type, name, value, index=0):
    nodes = [n for n in model.graph.node if n.op_type == op_type and n.domain == "nm_onnx"]
    for a in nodes[index].attribute:
        if a.name == name:
            a.i = value
            return
    raise AssertionError(f"no attribute {name}")


def test_validate_fails_on_changed_attribute(tiny_sparse, tmp_path, capsys):
    """n=8 -> n=6 in one site: its mask and output differ -> (b) FAIL, exit 1."""
    op = "NMSparseMatMul" if any(n.op_type == "NMSparseMatMul" for n in onnx.load(
        str(tiny_sparse / "model.onnx")).graph.node) else "NMMask"
    bad = _corrupt(tiny_sparse, tmp_path / "bad", lambda m: _set_attr(m, op, "n", 6, index=3))
    out = tmp_path / "report.json"
    r = _validate_inproc(capsys, tiny_export("llama"), bad, tiny_hf("llama"), "--seqlen", "64", "--checks", "bd",
                  "--json", str(out))
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "FAIL (b) layer-wise site parity" in r.stdout
    assert "PASS (d)" in r.stdout
    assert "FAILED: (b)" in r.stderr
    rep = json.loads(out.read_text())
    assert rep["failed_checks"] == ["(b) layer-wise site parity (masks, outputs)"]
    bad_sites = [s for s in rep["checks"][0]["details"]["per_site"] if s["mask_mismatches"]]
    assert len(bad_sites) == 1


def test_validate_fails_on_changed_constant(tiny_sparse, tmp_path, capsys):
    """A baked shift_bias scaled by 1.01: masks still agree, outputs do not -> (b) FAIL."""
    def edit(m):
        init = next(t for t in m.graph.initializer if t.name.endswith("shift_bias"))
        arr = numpy_helper.to_array(init) * np.float32(1.01)
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))

    bad = _corrupt(tiny_sparse, tmp_path / "bad", edit)
    r = _validate_inproc(capsys, tiny_export("llama"), bad, tiny_hf("llama"), "--seqlen", "64", "--checks", "b")
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "FAIL (b)" in r.stdout and "0 mask entries differ" in r.stdout


def test_validate_usage_errors(tiny_sparse, capsys):
    r = _validate_inproc(capsys, tiny_export("llama"), tiny_sparse, tiny_hf("llama"), "--checks", "xz")
    assert r.returncode == 2 and "--checks" in r.stderr
    r = _validate_inproc(capsys, tiny_export("llama"), "/no/such/model", tiny_hf("llama"), "--checks", "c")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_nm_onnx_validate_subcommand(tiny_sparse, capsys):
    """`nm-onnx validate` is the same command (DESIGN.md: one subcommand per pipeline step)."""
    from nm_onnx.cli import main

    capsys.readouterr()
    rc = main(["validate", "/no/such/dense", str(tiny_sparse), "--model", str(tiny_hf("llama")),
               "--recipe", RECIPE])
    assert rc == 2 and "'/no/such/dense' does not exist" in capsys.readouterr().err
    rc = main(["validate", str(tiny_export("llama")), str(tiny_sparse), "--model", str(tiny_hf("llama")),
               "--recipe", RECIPE, "--checks", "d"])
    out = capsys.readouterr()
    assert rc == 0 and "PASS (d)" in out.out


@pytest.mark.slow
def test_validate_passes_on_smollm2(tmp_path):
    """Definition of done: SmolLM2, 8:16 with median shift and variance correction, all four checks."""
    pytest.importorskip("nm_onnx.transform")
    dense = smollm2_export()
    sparse = _make_sparse(dense, tmp_path / "sparse")
    out = tmp_path / "report.json"
    r = _validate(dense, sparse, "smollm2-135m", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["passed"]
    assert {c["check"]: c for c in rep["checks"]}["b"]["details"]["sites"] == 210
