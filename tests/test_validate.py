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
    from nm_onnx.transform import transform

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
    dense = smollm2_export()
    sparse = _make_sparse(dense, tmp_path / "sparse")
    out = tmp_path / "report.json"
    r = _validate(dense, sparse, "smollm2-135m", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["passed"]
    assert {c["check"]: c for c in rep["checks"]}["b"]["details"]["sites"] == 210


def test_layerwise_check_finds_every_site_of_a_dynamo_export(tmp_path):
    """Dynamo names nodes node_linear_N: (b) reads the transform's site record, not a naming rule."""
    import torch

    from nm_onnx.models import load_hf_model
    from nm_onnx.reference import sparsify_model
    from nm_onnx.transform import transform
    from nm_onnx.validate import check_layerwise

    model, _ = load_hf_model(tiny_hf("llama"))
    ids = torch.randint(0, 500, (1, 8))
    prog = torch.onnx.export(model, (ids,), kwargs={"use_cache": False}, dynamo=True, optimize=False)
    prog.save(str(tmp_path / "dyn.onnx"))
    transform(tmp_path / "dyn.onnx", tmp_path / "sparse.onnx", RECIPE)
    sparsify_model(model, RECIPE)
    window = np.random.default_rng(0).integers(0, 500, 48)
    res = check_layerwise(tmp_path / "sparse.onnx", model, window)
    assert res.status == "PASS", res.details["failures"]
    assert res.details["sites"] == 14 and all(s["mask_mismatches"] == 0 for s in res.details["per_site"])


def _duplicate_named(src: Path, dst: Path) -> Path:
    """Layer 1's MLP renamed as TorchScript names a module's second call (`.../MatMul_1`, so its sites
    are '...#1') and given layer 0's weights: the ONNX twin of a model that calls one MLP twice."""
    from nm_onnx.graph import find_linear_sites, load_model

    sites = {s.module: s for s in find_linear_sites(load_model(src))}
    m = onnx.load(str(src / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        s0, s1 = sites[f"model.layers.0.mlp.{proj}"], sites[f"model.layers.1.mlp.{proj}"]
        inits[s1.weight].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[s0.weight]), s1.weight))
    for n in m.graph.node:
        if n.name.startswith("/model/layers.1/mlp/"):
            n.name = n.name.replace("/model/layers.1/mlp/", "/model/layers.0/mlp/") + "_1"  # TorchScript's 2nd call
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.onnx" and not f.name.startswith("nm_onnx"):
            shutil.copy(f, dst / f.name)
    onnx.save(m, str(dst / "model.onnx"))
    return dst


def test_validate_checks_duplicate_named_sites(tmp_path):
    """Two sites with one module path (model.layers.0.mlp.*_proj and ...#1): each is checked against the
    module call it belongs to, by the record, not by a name prefix that matches both."""
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.models import load_hf_model
    from nm_onnx.transform import transform
    from nm_onnx.validate import validate

    dense = _duplicate_named(tiny_export("llama"), tmp_path / "dense")
    modules = [s.module for s in find_linear_sites(load_model(dense))]
    assert "model.layers.0.mlp.down_proj#1" in modules
    sparse = tmp_path / "sparse"
    transform(dense, sparse, RECIPE)
    model, tok = load_hf_model(tiny_hf("llama"))
    model.model.layers[1].mlp = model.model.layers[0].mlp  # one module, called by both layers
    rep = validate(dense, sparse, "tiny", RECIPE, checks="abc", seqlen=48, limit=1, model=model, tokenizer=tok)
    by = {r.check: r for r in rep.results}
    assert rep.passed, [r.details.get("failures") for r in rep.results]
    assert by["b"].details["sites"] == 14
    assert {s["site"] for s in by["b"].details["per_site"]} >= {"model.layers.0.mlp.down_proj",
                                                                "model.layers.0.mlp.down_proj#1"}
    assert by["c"].details["sites"] == 14 and by["c"].status == "PASS"


def test_perplexity_verdict_is_three_way():
    from nm_onnx.validate import perplexity_verdict

    assert perplexity_verdict(0.002, 0.001) == "PASS"  # 0.2% + 2 x 0.1% <= 1%
    assert perplexity_verdict(0.002, 0.02) == "INCONCLUSIVE"  # the noise does not resolve 1%
    assert perplexity_verdict(0.05, 0.01) == "FAIL"  # 5% - 2 x 1% > 1%
    assert perplexity_verdict(0.015, 0.004) == "INCONCLUSIVE"  # over 1%, but within 2 s.e. of it
