"""SparsityRecipe: JSON round-trip, presets, validation errors, target matching, CLI listing."""

import json

import pytest

from nm_onnx.cli import main
from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import PRESETS, SparsityRecipe, parse_pattern, preset_names

LLAMA_PATHS = [
    f"model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
] + ["lm_head"]


def test_presets_cover_the_paper_configurations():
    names = preset_names()
    for p in ("2:4", "4:8", "8:16", "16:32"):
        for kind in ("magnitude", "median-shift", "static-shift", "variance", "learned-shift", "scale-shift",
                     "amber", "wanda", "clact", "median-variance"):
            assert f"{p}-{kind}" in names
    assert "unstructured-50" in names and "unstructured-70" in names
    assert len({r.digest() for r in PRESETS.values()}) == len(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip(name, tmp_path):
    r = SparsityRecipe.load(name)
    assert SparsityRecipe.from_json(r.to_json()) == r
    assert SparsityRecipe.from_json(r.to_json()).digest() == r.digest()
    r.save(tmp_path / "r.json")
    assert SparsityRecipe.load(tmp_path / "r.json") == r


def test_properties():
    r = SparsityRecipe.load("8:16-learned-shift")
    assert (r.n, r.m, r.sparsity, r.is_unstructured) == (8, 16, 0.5, False)
    assert r.needs_calibration and r.needs_fitting
    assert not SparsityRecipe.load("2:4-variance").needs_calibration
    assert SparsityRecipe.load("2:4-amber").needs_calibration
    assert SparsityRecipe.load("2:4-static-shift").needs_calibration
    u = SparsityRecipe.load("unstructured-70")
    assert u.is_unstructured and u.m is None and u.sparsity == 0.7
    assert u.keep_count(10) == 3 and u.group(10) == (3, 10)
    assert SparsityRecipe(pattern="2:4").keep_count(8) == 4
    assert parse_pattern("16:32") == (16, 32, 0.5)


def test_load_preset_returns_a_copy():
    r = SparsityRecipe.load("8:16-magnitude")
    r.calibration["samples"] = 3
    assert PRESETS["8:16-magnitude"].calibration["samples"] == 256


def test_partial_calibration_gets_defaults():
    r = SparsityRecipe.from_json(json.dumps({"name": "x", "pattern": "2:4", "calibration": {"samples": 8}}))
    assert r.calibration["samples"] == 8 and r.calibration["lr"] == 1e-4 and r.calibration["betas"] == [0.9, 0.95]


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"criterion": "bogus"}, "unknown criterion"),
        ({"shift": "bogus"}, "unknown shift"),
        ({"pattern": "4:4"}, "N must be smaller than M"),
        ({"pattern": "5:4"}, "N must be smaller than M"),
        ({"pattern": "0:4"}, "N must be at least 1"),
        ({"pattern": "8:128"}, "at most 64"),
        ({"pattern": "eight:16"}, "bad pattern"),
        ({"pattern": "2-4"}, "bad pattern"),
        ({"pattern": "unstructured:1.5"}, "(0, 1)"),
        ({"pattern": "unstructured:x"}, "bad pattern"),
        ({"targets": []}, "empty"),
        ({"targets": "model.*"}, "list"),
        ({"scale_shift": "yes"}, "true or false"),
        ({"colour": "red"}, "unknown recipe key"),
        ({"calibration": {"sampels": 3}}, "unknown calibration key"),
        ({"calibration": {"samples": 0}}, "at least 1"),
        ({"calibration": {"lr": "fast"}}, "bad value"),
        ({"calibration": {"betas": [0.9]}}, "betas"),
    ],
)
def test_validation_errors(patch, fragment):
    d = SparsityRecipe(name="t").to_dict()
    d.update(patch)
    with pytest.raises(NmOnnxError, match=None) as e:
        SparsityRecipe.from_json(json.dumps(d))
    assert fragment in str(e.value)


def test_malformed_json_and_unknown_preset(tmp_path):
    with pytest.raises(NmOnnxError, match="malformed JSON"):
        SparsityRecipe.from_json("{not json")
    with pytest.raises(NmOnnxError, match="must be a JSON object"):
        SparsityRecipe.from_json("[1, 2]")
    with pytest.raises(NmOnnxError, match="did you mean 8:16-magnitude"):
        SparsityRecipe.load("8:16-magnitud")
    bad = tmp_path / "bad.json"
    bad.write_text('{"pattern": "3:3"}')
    with pytest.raises(NmOnnxError, match="bad.json"):
        SparsityRecipe.load(bad)


def test_match_targets_and_exclude():
    r = SparsityRecipe.load("8:16-magnitude")
    assert r.match(LLAMA_PATHS) == LLAMA_PATHS[:-1]
    r.exclude = ["model.layers.0.*", "*.k_proj"]
    got = r.match(LLAMA_PATHS)
    assert got == [p for p in LLAMA_PATHS[7:14] if not p.endswith("k_proj")]
    phi3 = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert SparsityRecipe().match(phi3) == phi3[:-1]


def test_target_matching_nothing_is_an_error():
    r = SparsityRecipe(name="t", targets=["model.layers.*.mlp.down_prj"])
    with pytest.raises(NmOnnxError, match="down_prj.*matches no module; available: model.layers.0"):
        r.match(LLAMA_PATHS)


def test_cli_lists_presets(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert main(["recipes", "2:4-variance"]) == 0
    assert SparsityRecipe.from_json(capsys.readouterr().out) == PRESETS["2:4-variance"]
    assert main(["recipes", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
