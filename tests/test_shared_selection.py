"""Shared selection (`share_selection`): one mask per q/k/v and gate/up group, everywhere.

The recipe groups the projections that read one activation; the PyTorch reference gives a group the
channel factors of its stacked weights and one learned shift; calibration fits that one shift and
stores it per projection; transform packs a group of separate MatMuls into one (horizontal fusion)
and a packed site, of an optimum export or of ORT GenAI's builder, takes its projections' constants.
Checked end to end with `validate` (a: logits, b: every site's mask and output, c: teacher forcing)
on real exports of a tiny random Llama, and with og.Generator on a GenAI build.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import needs_library
from models_cache import tiny_export, tiny_hf

from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import SparsityRecipe

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ATTN = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
MLP = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_recipe_share_selection_groups_and_json():
    plain = SparsityRecipe.load("8:16-amber")
    shared = SparsityRecipe.load("8:16-amber+shared")
    assert shared.share_selection and shared.name == "8:16-amber+shared" and not plain.share_selection
    assert "share_selection" not in plain.to_dict()  # the digests of recipes without it do not change
    assert SparsityRecipe.from_json(shared.to_json()).digest() == shared.digest() != plain.digest()
    settings = shared.resolve(ATTN + MLP)
    assert shared.selection_groups(settings) == {
        "model.layers.0.self_attn.qkv_proj": ATTN[:3], "model.layers.0.self_attn.o_proj": [ATTN[3]],
        "model.layers.0.mlp.gate_up_proj": MLP[:2], "model.layers.0.mlp.down_proj": [MLP[2]]}
    assert all(len(m) == 1 for m in plain.selection_groups(plain.resolve(ATTN + MLP)).values())
    # a dense member leaves the others a group; members with different settings cannot share a mask
    d = shared.to_dict()
    d["overrides"] = [{"modules": ["*.v_proj"], "pattern": "dense"}]
    partial = SparsityRecipe.from_dict(d)
    assert partial.selection_groups(partial.resolve(ATTN + MLP))["model.layers.0.self_attn.qkv_proj"] == ATTN[:2]
    d["overrides"] = [{"modules": ["*.k_proj"], "pattern": "4:8"}]
    mixed = SparsityRecipe.from_dict(d)
    with pytest.raises(NmOnnxError, match=r"share_selection gives '.*q_proj' and '.*k_proj' one mask"):
        mixed.selection_groups(mixed.resolve(ATTN + MLP))
    with pytest.raises(NmOnnxError, match="'share_selection' must be true or false"):
        SparsityRecipe.from_dict({**shared.to_dict(), "share_selection": 1})


def test_reference_gives_a_group_one_mask():
    """Stacked-weight channel factors and one shared learned shift: q, k and v choose the same mask
    (without sharing, the per-projection amber factors make them choose different ones)."""
    from nm_onnx.models import load_hf_model
    from nm_onnx.reference import channel_factors, sparse_modules, sparsify_model, unsparsify_model
    from nm_onnx.reference import functional as F

    model, _ = load_hf_model(tiny_hf("llama"))
    x = torch.randn(5, 64)
    masks = {}
    for name in ("8:16-amber", "8:16-amber+shared"):
        sparsify_model(model, name)
        w = sparse_modules(model)
        qkv = [w[p] for p in ATTN[:3]]
        masks[name] = [F.nm_mask(x.abs() * m.channel_scale, 8, 16) for m in qkv]
        if name.endswith("+shared"):
            stacked = torch.cat([m.weight for m in qkv])
            assert all(np.array_equal(m.channel_scale.numpy(), channel_factors(stacked, "amber")) for m in qkv)
        unsparsify_model(model)
    assert all(torch.equal(masks["8:16-amber+shared"][0], m) for m in masks["8:16-amber+shared"][1:])
    assert any(not torch.equal(masks["8:16-amber"][0], m) for m in masks["8:16-amber"][1:])
    sparsify_model(model, "8:16-learned-shift+shared", strict=False)
    w = sparse_modules(model)
    assert w[ATTN[0]].learned_shift is w[ATTN[1]].learned_shift is w[ATTN[2]].learned_shift
    assert w[MLP[0]].learned_shift is w[MLP[1]].learned_shift is not w[MLP[2]].learned_shift
    unsparsify_model(model)


def test_calibration_fits_one_shift_per_group(shared_artifact):
    art = shared_artifact
    qkv = [art.constants(p) for p in ATTN[:3]]
    assert np.abs(qkv[0]["learned_shift"]).max() > 0  # fitted, not the zero start
    for c in qkv[1:]:  # stored per projection, one value per group
        assert np.array_equal(c["learned_shift"], qkv[0]["learned_shift"])
        assert np.array_equal(c["channel_scale"], qkv[0]["channel_scale"])
    assert not np.array_equal(qkv[0]["scale_a"][:32], qkv[1]["scale_a"][:32])  # output side: per projection
    assert not np.array_equal(art.constants(MLP[0])["learned_shift"], art.constants(MLP[2])["learned_shift"])


@needs_library
@pytest.mark.parametrize("recipe", ["8:16-amber+shared", "calibrated"])
def test_optimum_export_packs_groups_and_validates(tmp_path, recipe, shared_artifact):
    """transform packs q/k/v and gate/up of the optimum export into one MatMul each (one NMSparseMatMul
    per group, what the records say), and validate's checks hold against the shared reference."""
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.passes.record import site_records
    from nm_onnx.transform import transform
    from nm_onnx.validate import validate

    art = shared_artifact if recipe == "calibrated" else None
    r = art.recipe if art is not None else SparsityRecipe.load(recipe)
    dense, out = tiny_export("llama"), tmp_path / "sparse"
    report = transform(dense, out, r, calibration=art)
    assert report.passes.packed == {f"model.layers.{i}.{g}": "packed" for i in (0, 1)
                                    for g in ("self_attn.qkv_proj", "mlp.gate_up_proj")}
    assert json.loads((out / "nm_onnx_transform.json").read_text())["packed"] == report.passes.packed
    model = load_model(out / "model.onnx")
    records = site_records(model)
    assert sorted(r["kind"] for r in records) == ["down", "down", "gate_up", "gate_up", "o", "o", "qkv", "qkv"]
    assert all(r["fused"] for r in records)
    kinds = {s.kind for s in find_linear_sites(model)}
    assert not kinds & {"q", "k", "v", "gate", "up"}
    assert sum(1 for n in model.graph if n.op_type == "Split") == 4
    result = validate(dense, out, tiny_hf("llama"), r, calibration=art and art.path, checks="abc", seqlen=48, limit=1)
    checks = {x.check: x for x in result.results}
    assert all(x.status == "PASS" for x in checks.values()), [x.line() for x in checks.values()]
    assert checks["b"].details["sites"] == 8 and checks["b"].details["sites_with_mask_mismatch"] == 0


@needs_library
def test_groups_that_cannot_be_packed_stay_separate_and_say_why(tmp_path):
    from nm_onnx.transform import transform

    d = SparsityRecipe.load("8:16-median-shift+shared").to_dict()
    d["overrides"] = [{"modules": ["*.v_proj"], "pattern": "dense"}]
    report = transform(tiny_export("llama"), tmp_path / "s", SparsityRecipe.from_dict(d))
    assert report.passes.packed["model.layers.0.self_attn.qkv_proj"].startswith("only some of the group's")
    assert report.passes.packed["model.layers.0.mlp.gate_up_proj"] == "packed"
    assert "not packed (2 group(s)): only some" in report.passes.table()
    kinds = sorted(s["kind"] for s in report.passes.sites if s["action"] == "sparse")
    assert kinds == ["down", "down", "gate_up", "gate_up", "k", "k", "o", "o", "q", "q"]
