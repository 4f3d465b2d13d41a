"""Mixed recipes: ordered per-site overrides of pattern and mitigations, resolved once (recipe.resolve)
and honoured by JSON, the PyTorch reference, calibration, the passes, validate and inspect."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from models_cache import tiny_export, tiny_hf

from nm_onnx import ops
from nm_onnx.cli import main
from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import PRESETS, SparsityRecipe

LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PATHS = [f"model.layers.{i}.{p}" for i in range(2) for p in LAYER] + ["lm_head"]
K = {p: 128 if p.endswith("down_proj") else 64 for p in PATHS}  # the tiny llama: hidden 64, MLP 128

MIXED = {
    "name": "mixed", "pattern": "8:16", "shift": "median",
    "overrides": [
        {"modules": ["model.layers.0.*", "*.down_proj"], "pattern": "12:16"},
        {"modules": ["model.layers.1.mlp.up_proj"], "pattern": "dense"},
        {"modules": ["*.q_proj"], "variance_correction": True},
        {"modules": ["model.layers.1.self_attn.k_proj"], "pattern": "2:4", "shift": "none"},
        {"modules": ["model.layers.1.self_attn.v_proj"], "pattern": "16:32"},
        {"modules": ["model.layers.0.mlp.gate_proj"], "pattern": "6:16"},
    ],
}
WANT = {  # module -> (n, m, shift, variance_correction); None: dense
    "model.layers.0.self_attn.q_proj": (12, 16, "median", True),
    "model.layers.0.self_attn.k_proj": (12, 16, "median", False),
    "model.layers.0.self_attn.v_proj": (12, 16, "median", False),
    "model.layers.0.self_attn.o_proj": (12, 16, "median", False),
    "model.layers.0.mlp.gate_proj": (6, 16, "median", False),
    "model.layers.0.mlp.up_proj": (12, 16, "median", False),
    "model.layers.0.mlp.down_proj": (12, 16, "median", False),
    "model.layers.1.self_attn.q_proj": (8, 16, "median", True),
    "model.layers.1.self_attn.k_proj": (2, 4, "none", False),
    "model.layers.1.self_attn.v_proj": (16, 32, "median", False),
    "model.layers.1.self_attn.o_proj": (8, 16, "median", False),
    "model.layers.1.mlp.gate_proj": (8, 16, "median", False),
    "model.layers.1.mlp.up_proj": None,
    "model.layers.1.mlp.down_proj": (12, 16, "median", False),
}
needs_library = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


def _recipe(**patch) -> SparsityRecipe:
    return SparsityRecipe.from_dict({**MIXED, **patch})


# ---------------------------------------------------------------------------------------- recipe
def test_mixed_recipe_round_trips_through_json(tmp_path):
    r = _recipe()
    again = SparsityRecipe.from_json(r.to_json())
    assert again == r and again.digest() == r.digest() and again.to_dict() == r.to_dict()
    assert r.to_dict()["overrides"] == MIXED["overrides"]
    r.save(tmp_path / "r.json")
    assert SparsityRecipe.load(tmp_path / "r.json").digest() == r.digest()
    assert "[*.q_proj -> variance_correction]" in r.describe() and "pattern=dense" in r.describe()
    other = _recipe(overrides=MIXED["overrides"][:-1])
    assert other.digest() != r.digest()


def test_recipes_without_overrides_keep_their_json_and_digest():
    r = PRESETS["8:16-magnitude"]
    assert "overrides" not in r.to_dict() and "overrides" not in r.to_json()
    # the digest of this preset before overrides existed (artifacts and models carry it)
    assert r.digest() == "bf445090d2572168f797e55922deecc63caadedf94d249419d281d1e897fc402"
    assert SparsityRecipe.from_dict({**r.to_dict(), "overrides": []}).digest() == r.digest()


def test_resolve_applies_overrides_in_order_per_field():
    settings = _recipe().resolve(PATHS, K)
    assert list(settings) == [p for p in PATHS if p != "lm_head"]  # targets as before
    for path, want in WANT.items():
        s = settings[path]
        if want is None:
            assert s.dense and s.n is None and not s.needs_calibration
        else:
            assert (s.n, s.m, s.shift, s.variance_correction) == want, path
    later = SparsityRecipe.from_dict({"name": "x", "pattern": "8:16", "overrides": [
        {"modules": ["*.q_proj"], "pattern": "12:16", "shift": "mean"},
        {"modules": ["model.layers.0.*"], "pattern": "2:4"}]}).resolve(PATHS)
    q0 = later["model.layers.0.self_attn.q_proj"]
    assert (q0.pattern, q0.shift) == ("2:4", "mean")  # the later override wins the pattern, the shift stays


def test_recipe_level_needs_cover_the_overrides():
    r = SparsityRecipe.from_dict({"name": "x", "pattern": "8:16", "overrides": [
        {"modules": ["*.down_proj"], "shift": "learned"}]})
    assert r.needs_fitting and r.needs_calibration
    s = r.resolve(PATHS)
    assert s["model.layers.0.mlp.down_proj"].needs_fitting and not s["model.layers.0.mlp.up_proj"].needs_calibration


@pytest.mark.parametrize("patch, fragment", [
    ({"overrides": [{"modules": ["*.dwn_proj"], "pattern": "12:16"}]},
     r"overrides\[0\] module '\*.dwn_proj' matches no selected module"),
    ({"overrides": [{"modules": ["lm_head"], "pattern": "12:16"}]},  # not a target: nothing to override
     r"overrides\[0\] module 'lm_head' matches no selected module"),
    ({"overrides": [{"modules": ["*.q_proj"], "pattern": "12:12"}]},
     r"overrides\[0\]: bad pattern|overrides\[0\]: .*N must be smaller than M"),
    ({"overrides": [{"modules": ["*.q_proj"], "pattern": "twelve:16"}]}, r"overrides\[0\]: bad pattern"),
    ({"overrides": [{"modules": ["*.q_proj"], "criterion": "bogus"}]}, r"overrides\[0\]: unknown criterion"),
    ({"overrides": [{"modules": ["*.q_proj"], "scale_shift": "yes"}]}, r"overrides\[0\]: 'scale_shift' must be"),
    ({"overrides": [{"modules": ["*.q_proj"], "patern": "2:4"}]}, r"overrides\[0\]: unknown key\(s\) \['patern'\]"),
    ({"overrides": [{"modules": [], "pattern": "2:4"}]}, r"overrides\[0\]: 'modules' must be a non-empty list"),
    ({"overrides": [{"modules": ["*.q_proj"]}]}, r"overrides\[0\] sets nothing"),
    ({"overrides": {"modules": ["*"]}}, "'overrides' must be a list"),
    ({"pattern": "dense", "overrides": []}, "bad pattern 'dense'"),
    ({"overrides": [{"modules": ["*"], "pattern": "dense"}]}, "make every selected module dense"),
    ({"overrides": [{"modules": ["*.q_proj"], "pattern": "6:24"}]},
     r"pattern 6:24 does not divide K=64 at site 'model.layers.0.self_attn.q_proj'"),
])
def test_override_errors_name_what_is_wrong(patch, fragment):
    with pytest.raises(NmOnnxError, match=fragment):
        _recipe(**patch).resolve(PATHS, K)


def test_sparsify_model_gives_each_site_its_setting():
    from nm_onnx.models import load_hf_model
    from nm_onnx.reference import sparse_modules, sparsify_model, unsparsify_model

    model, _ = load_hf_model(tiny_hf("llama"))
    sparsify_model(model, _recipe())
    try:
        wrapped = sparse_modules(model)
        assert set(wrapped) == {p for p, w in WANT.items() if w is not None}
        for p, w in wrapped.items():
            assert (w.n, w.m, w.setting.shift, w.setting.variance_correction) == WANT[p]
    finally:
        unsparsify_model(model)
    with pytest.raises(NmOnnxError, match="does not divide K=64 at site 'model.layers.1.self_attn.o_proj'"):
        sparsify_model(model, _recipe(overrides=[{"modules": ["model.layers.1.self_attn.o_proj"], "pattern": "1:48"}]))
    assert not sparse_modules(model)


# ---------------------------------------------------------------------------------- transform
def _nm_nodes(path) -> dict[str, onnx.NodeProto]:
    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    out = {}
    for n in m.graph.node:
        if n.domain == "nm_onnx" and n.op_type in ("NMSparseMatMul", "NMMask"):
            site = next(p.value for p in n.metadata_props if p.key == "nm_onnx.site")
            out[site] = n
    return out


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.fixture(scope="module")
def mixed_sparse(tmp_path_factory):
    from nm_onnx.transform import transform

    d = tmp_path_factory.mktemp("mixed")
    _recipe().save(d / "mixed.json")
    report = transform(tiny_export("llama"), d / "sparse", d / "mixed.json")
    return d, report


@needs_library
def test_transform_gives_each_site_its_pattern(mixed_sparse, capsys):
    d, report = mixed_sparse
    records = {r["module"]: r for r in report.passes.records}
    assert set(records) == {p for p, w in WANT.items() if w is not None}
    nodes = _nm_nodes(d / "sparse")
    assert set(nodes) == set(records)
    for p, (n, m, shift, vc) in ((p, w) for p, w in WANT.items() if w is not None):
        r = records[p]
        assert (r["n"], r["m"], r["shift"], r["variance_correction"]) == (n, m, shift, vc), p
        node = nodes[p]
        assert node.op_type == "NMSparseMatMul" and r["fused"], p  # magnitude, dynamic shifts: all fuse
        assert (_attr(node, "n"), _attr(node, "m")) == (n, m), p
        assert _attr(node, "shift").decode() == shift and _attr(node, "variance_correction") == int(vc), p
    saved = json.loads((d / "sparse" / "nm_onnx_transform.json").read_text())
    assert {r["module"]: (r["n"], r["m"]) for r in saved["records"]} == {p: (r["n"], r["m"]) for p, r in records.items()}
    dense = [s for s in report.passes.sites if s["action"] == "dense"]
    assert {s["module"] for s in dense} == {"model.layers.1.mlp.up_proj", "lm_head"}
    table = report.table()
    assert "patterns: 12:16 x 7, 8:16 x 3, 6:16 x 1, 2:4 x 1, 16:32 x 1" in table
    assert "dense (1 site(s)): pattern 'dense' set by a recipe override" in table
    meta = {p.key: p.value for p in onnx.load(str(d / "sparse" / "model.onnx"), load_external_data=False).metadata_props}
    assert SparsityRecipe.from_json(meta["nm_onnx.recipe"]) == _recipe()
    assert meta["nm_onnx.recipe_digest"] == _recipe().digest()
    capsys.readouterr()
    assert main(["inspect", str(d / "sparse")]) == 0
    out = capsys.readouterr().out
    assert "recipe mixed (12:16 x 7, 8:16 x 3, 6:16 x 1, 2:4 x 1, 16:32 x 1), 13 sparse sites" in out
    assert "model.layers.1.mlp.up_proj" in out.split("left dense")[1]


@needs_library
def test_validate_layerwise_is_exact_on_a_mixed_recipe(mixed_sparse, capsys):
    from nm_onnx.validate import check_kernels
    from nm_onnx.validate import main as validate_main

    d, _ = mixed_sparse
    capsys.readouterr()
    rc = validate_main([str(tiny_export("llama")), str(d / "sparse"), "--model", str(tiny_hf("llama")),
                        "--recipe", str(d / "mixed.json"), "--seqlen", "64", "--checks", "b",
                        "--json", str(d / "b.json")])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err[-3000:]
    b = json.loads((d / "b.json").read_text())["checks"][0]
    assert b["status"] == "PASS" and b["details"]["sites"] == 13
    assert all(s["mask_mismatches"] == 0 and s["rel_error"] <= 1e-5 for s in b["details"]["per_site"])
    # (d) also checks the kernels at the patterns the model uses beyond its fixed set
    base, extra = check_kernels(), check_kernels(patterns=[(12, 16), (6, 16)])
    assert extra.status == "PASS" and extra.details["cases"] > base.details["cases"]


@needs_library
def test_transform_errors_name_the_site(tmp_path):
    from nm_onnx.transform import transform

    bad = _recipe(overrides=[{"modules": ["model.layers.0.mlp.gate_proj"], "pattern": "6:24"}])
    with pytest.raises(NmOnnxError, match="does not divide K=64 at site 'model.layers.0.mlp.gate_proj'"):
        transform(tiny_export("llama"), tmp_path / "a", bad)
    with pytest.raises(NmOnnxError, match="unstructured:0.5' at site 'model.layers.0.mlp.down_proj'"):
        transform(tiny_export("llama"), tmp_path / "b",
                  _recipe(overrides=[{"modules": ["model.layers.0.mlp.down_proj"], "pattern": "unstructured:0.5"}]))
    with pytest.raises(NmOnnxError, match="matches no selected module"):
        transform(tiny_export("llama"), tmp_path / "c", _recipe(overrides=[{"modules": ["*.o_prj"], "shift": "none"}]))
    with pytest.raises(NmOnnxError, match="needs calibration constants learned_shift"):
        transform(tiny_export("llama"), tmp_path / "d",
                  _recipe(overrides=[{"modules": ["*.down_proj"], "shift": "learned"}]))
    assert not any(tmp_path.iterdir())


# -------------------------------------------------------------------------------- calibration
CALIBRATED = {
    "name": "mixed-calibrated", "pattern": "8:16",
    "overrides": [
        {"modules": ["model.layers.0.self_attn.*"], "shift": "static", "pattern": "12:16"},
        {"modules": ["*.down_proj"], "shift": "learned", "pattern": "4:8"},
        {"modules": ["model.layers.1.mlp.gate_proj"], "scale_shift": True},
        {"modules": ["*.o_proj"], "criterion": "amber"},
        {"modules": ["model.layers.1.mlp.up_proj"], "pattern": "dense"},
    ],
    "calibration": {"samples": 4, "seqlen": 32},
}


@needs_library
def test_calibrate_transform_validate_a_mixed_recipe(tmp_path, capsys):
    import torch

    from nm_onnx.calibration import calibrate, load_artifact
    from nm_onnx.models import load_hf_model
    from nm_onnx.transform import transform

    torch.set_num_threads(1)
    recipe = SparsityRecipe.from_dict(CALIBRATED)
    model, _ = load_hf_model(tiny_hf("llama"))
    windows = np.random.default_rng(0).integers(0, 512, size=(4, 32))
    art = calibrate(model, recipe, windows, tmp_path / "cal", progress=False)
    loaded = load_artifact(tmp_path / "cal")
    assert loaded.recipe == recipe and loaded.digest() == art.digest()
    assert loaded.report["recipe_digest"] == recipe.digest()
    by_name: dict[str, set] = {}
    for key in loaded.tensors:
        module, _, name = key.rpartition(".")
        by_name.setdefault(name, set()).add(module)
    attn0 = {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert by_name["static_shift"] == attn0
    assert by_name["learned_shift"] == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert by_name["scale_a"] == by_name["scale_b"] == {"model.layers.1.mlp.gate_proj"}
    assert by_name["channel_scale"] == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert "model.layers.1.mlp.up_proj" not in loaded.report["sites"]  # dense: nothing calibrated
    assert np.abs(loaded.tensors["model.layers.1.mlp.down_proj.learned_shift"]).sum() > 0  # fitted

    # transform with the artifact as the recipe: each site gets its pattern and its constants
    report = transform(tiny_export("llama"), tmp_path / "sparse", tmp_path / "cal", calibration=tmp_path / "cal")
    records = {r["module"]: r for r in report.passes.records}
    assert len(records) == 13 and "model.layers.1.mlp.up_proj" not in records
    assert (records["model.layers.0.self_attn.k_proj"]["n"], records["model.layers.0.self_attn.k_proj"]["m"]) == (12, 16)
    assert records["model.layers.0.self_attn.k_proj"]["shift"] == "static"
    assert (records["model.layers.1.mlp.down_proj"]["n"], records["model.layers.1.mlp.down_proj"]["shift"]) == (4, "learned")
    assert records["model.layers.1.mlp.gate_proj"]["scale_shift"] and records["model.layers.1.mlp.gate_proj"]["n"] == 8
    assert records["model.layers.1.self_attn.o_proj"]["criterion"] == "amber"

    capsys.readouterr()
    from nm_onnx.validate import main as validate_main

    rc = validate_main([str(tiny_export("llama")), str(tmp_path / "sparse"), "--model", str(tiny_hf("llama")),
                        "--recipe", str(tmp_path / "cal"), "--calibration", str(tmp_path / "cal"),
                        "--seqlen", "64", "--checks", "b"])
    out = capsys.readouterr()
    assert rc == 0 and "PASS (b)" in out.out, out.out + out.err[-3000:]

    # an artifact belongs to its recipe's overrides too
    other = SparsityRecipe.from_dict({**CALIBRATED, "overrides": CALIBRATED["overrides"][:-1]})
    with pytest.raises(NmOnnxError, match="differs from 'mixed-calibrated' in overrides"):
        transform(tiny_export("llama"), tmp_path / "other", other, calibration=tmp_path / "cal")


@needs_library
def test_cli_override_error_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({**MIXED, "overrides": [{"modules": ["*.dwn_proj"], "pattern": "2:4"}]}))
    capsys.readouterr()
    assert main(["transform", str(tiny_export("llama")), str(tmp_path / "out"), "--recipe", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "overrides[0] module '*.dwn_proj' matches no selected module" in err
    assert not (tmp_path / "out").exists()
