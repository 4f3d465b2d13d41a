"""Graph passes on small inline ONNX-text graphs: op types produced, numerical equality of the unfused,
fused and portable forms with the numpy references (ReferenceEvaluator) and with ORT + the op library
under ORT_DISABLE_ALL, against the PyTorch reference `sparse_linear`; failed matches are explained."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from nm_onnx.calibration import CalibrationArtifact
from nm_onnx.errors import NmOnnxError
from nm_onnx.ops import REFERENCE_OPS
from nm_onnx.passes import run_pipeline
from nm_onnx.passes.fuse import FusePass
from nm_onnx.passes.locate import LocatePass
from nm_onnx.recipe import SparsityRecipe
from nm_onnx.reference import channel_factors, sparse_linear
from nm_onnx.runtime import make_session

K, O = 32, 12
MODULE = "model.layers.0.mlp.down_proj"
PREFIX = "/model/layers.0/mlp/down_proj"


def linear_model(dtype: str = "float", via: str = "", bias: bool = False, k: int = K, o: int = O, seed: int = 0):
    """An exported-style linear: X -> MatMul(X, B) [-> Add(bias)], B reached directly, via Cast or Transpose."""
    rng = np.random.default_rng(seed)
    np_dt = np.float16 if dtype == "float16" else np.float32
    w = rng.standard_normal((o, k)).astype(np.float32) / np.sqrt(k)  # W [O, K]
    body = []
    if via == "cast":  # float32 weights cast to the float16 activation type
        body.append("Bc = Cast <to = 10> (B)")
        b_name, b_store = "Bc", w.T.astype(np.float32)
    elif via == "transpose":  # weight stored as W [O, K] (tied lm_head style)
        body.append("Bt = Transpose <perm = [1, 0]> (Wt)")
        b_name, b_store = "Bt", w.astype(np_dt)
    else:
        b_name, b_store = "B", w.T.astype(np_dt)
    body.append(f"mm = MatMul (X, {b_name})")
    body.append("Y = Add (mm, bias)" if bias else "Y = Identity (mm)")
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g ({dtype}[2, 5, {k}] X) => ({dtype}[2, 5, {o}] Y) {{
      {chr(10).join(body)}
    }}"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(b_store, "Wt" if via == "transpose" else "B"))
    bvec = rng.standard_normal(o).astype(np_dt)
    if bias:
        model.graph.initializer.append(numpy_helper.from_array(bvec, "bias"))
    for node in model.graph.node:
        node.name = f"{PREFIX}/{node.op_type}"
    x = (rng.standard_normal((2, 5, k)) + 0.3).astype(np_dt)
    return model, w, (bvec if bias else None), x


def recipe(**kw) -> SparsityRecipe:
    kw.setdefault("pattern", "4:8")
    return SparsityRecipe(name="t", targets=["model.layers.*.mlp.*"], **kw).validate()


def artifact(r: SparsityRecipe, k: int = K, o: int = O, seed: int = 1) -> CalibrationArtifact:
    rng = np.random.default_rng(seed)
    t = {
        f"{MODULE}.static_shift": np.array([0.2], np.float32),
        f"{MODULE}.learned_shift": (0.1 * rng.standard_normal(k)).astype(np.float32),
        f"{MODULE}.scale_a": (0.1 * rng.standard_normal(o)).astype(np.float32),
        f"{MODULE}.scale_b": (0.1 * rng.standard_normal(o)).astype(np.float32),
    }
    return CalibrationArtifact(recipe=r, tensors=t)


def transformed(model, r, cal=None, fuse=True, portable=False):
    m = ir.serde.deserialize_model(model)
    report = run_pipeline(m, r, cal, fuse=fuse, portable=portable)
    return ir.serde.serialize_model(m), report


def expected(r, w, b, x, cal=None):
    c = cal.constants(MODULE) if cal is not None else {}
    t = lambda a: None if a is None else torch.tensor(np.asarray(a, np.float32))
    cs = channel_factors(w, r.criterion) if r.criterion in ("amber", "wanda") else None
    y = sparse_linear(
        t(x), t(w), t(b), n=r.n, m=r.m, criterion=r.criterion, shift=r.shift,
        variance_correction=r.variance_correction, channel_scale=t(cs),
        static_shift=t(c.get("static_shift")) if r.shift == "static" else None,
        learned_shift=t(c.get("learned_shift")) if r.shift == "learned" else None,
        scale_a=t(c.get("scale_a")) if r.scale_shift else None,
        scale_b=t(c.get("scale_b")) if r.scale_shift else None,
    )
    return y.numpy()


def run_reference(proto, x):
    return ReferenceEvaluator(proto, new_ops=REFERENCE_OPS).run(None, {"X": x})[0]


def run_ort(proto, x, tmp_path, use_library=True, name="m.onnx"):
    path = tmp_path / name
    onnx.save(proto, str(path))
    sess = make_session(path, providers=["CPUExecutionProvider"], optimization="none", use_library=use_library)
    return sess.run(None, {"X": x})[0]


def op_types(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


RECIPES = {
    "magnitude": {},
    "median-shift": {"shift": "median"},
    "mean-shift": {"shift": "mean"},
    "variance": {"variance_correction": True},
    "median-variance": {"shift": "median", "variance_correction": True},
    "mean-variance": {"shift": "mean", "variance_correction": True},
    "static-shift": {"shift": "static"},
    "learned-shift": {"shift": "learned"},
    "scale-shift": {"scale_shift": True},
    "amber": {"criterion": "amber"},
    "wanda-median": {"criterion": "wanda", "shift": "median"},
    "clact": {"criterion": "clact"},
    "static-variance": {"shift": "static", "variance_correction": True},
    "learned-variance-scale": {"shift": "learned", "variance_correction": True, "scale_shift": True},
    "amber-median-variance-2:4": {"criterion": "amber", "shift": "median", "variance_correction": True, "pattern": "2:4"},
}
UNFUSABLE = {"clact": "clact", "static-variance": "before a static/learned shift", "learned-variance-scale": "learned"}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", list(RECIPES))
def test_float32_forms_agree_with_references(name, bias, tmp_path):
    r = recipe(**RECIPES[name])
    cal = artifact(r) if r.shift in ("static", "learned") or r.scale_shift else None
    model, w, b, x = linear_model(bias=bias)
    want = expected(r, w, b, x, cal)
    unfused, _rep_u = transformed(model, r, cal, fuse=False)
    fused, rep_f = transformed(model, r, cal, fuse=True)
    assert "NMMask" in op_types(unfused) and "NMSparseMatMul" not in op_types(unfused)
    if name in UNFUSABLE:
        assert "NMSparseMatMul" not in op_types(fused)
        assert UNFUSABLE[name] in rep_f.fused[MODULE]
    else:
        assert rep_f.fused[MODULE] == "fused"
        types = op_types(fused)
        assert types.count("NMSparseMatMul") == 1 and "NMMask" not in types and "MatMul" not in types
        assert "TokenShift" not in types and "ReduceMean" not in types
    for proto, label in ((unfused, "unfused"), (fused, "fused")):
        ref = run_reference(proto, x)
        np.testing.assert_allclose(ref, want, rtol=1e-5, atol=2e-5, err_msg=f"{label} reference")
        got = run_ort(proto, x, tmp_path, name=f"{label}.onnx")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"{label} ORT")


@pytest.mark.parametrize("name", ["median-variance", "amber", "scale-shift", "clact"])
def test_portable_runs_without_library(name, tmp_path):
    r = recipe(**RECIPES[name])
    cal = artifact(r) if name == "scale-shift" else None
    model, w, b, x = linear_model(bias=True)
    proto, _ = transformed(model, r, cal, fuse=True, portable=True)
    assert {f.name for f in proto.functions} >= {"NMMask", "NMSparseMatMul", "TokenShift"}
    got = run_ort(proto, x, tmp_path, use_library=False)
    np.testing.assert_allclose(got, expected(r, w, b, x, cal), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("via", ["", "cast", "transpose"])
@pytest.mark.parametrize("fuse", [False, True])
def test_float16_and_weight_paths(via, fuse, bias, tmp_path):
    """MatMul with and without a Cast (or Transpose) on the weight, with and without a bias Add."""
    dtype = "float" if via == "transpose" else "float16"
    r = recipe(shift="median", variance_correction=True, criterion="amber")
    model, w, b, x = linear_model(dtype=dtype, via=via, bias=bias)
    proto, rep = transformed(model, r, fuse=fuse)
    assert rep.fused[MODULE] == ("fused" if fuse else "--no-fuse")
    types = op_types(proto)
    assert types.count("Add") == (bias + (0 if fuse else 1))  # the linear's bias Add (+ unfused shift bias)
    assert types.count("Cast") == (via == "cast") + (0 if fuse else 3)  # (+ 3 variance-correction casts)
    if fuse:
        node = next(n for n in proto.graph.node if n.op_type == "NMSparseMatMul")
        producers = {o: n.op_type for n in proto.graph.node for o in n.output}
        assert producers.get(node.input[1]) == {"cast": "Cast", "transpose": "Transpose"}.get(via)
        assert types.count("MatMul") == 0
    else:
        assert types.count("MatMul") == 1 and types.count("NMMask") == 1 and types.count("TokenShift") == 1
    ref = run_reference(proto, x)
    got = run_ort(proto, x, tmp_path)
    tol = 2e-2 if dtype == "float16" else 2e-5
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)
    if dtype == "float":
        np.testing.assert_allclose(got, expected(r, w, b, x), rtol=1e-5, atol=2e-5)


def test_inserted_names_follow_the_site():
    r = recipe(shift="median", criterion="amber", variance_correction=True)
    model, *_ = linear_model(bias=True)
    for fuse in (False, True):
        proto, _ = transformed(model, r, fuse=fuse)
        new_nodes = [n for n in proto.graph.node if n.domain == "nm_onnx" or n.op_type not in ("MatMul", "Add")]
        assert new_nodes and all(n.name.startswith(PREFIX + "/") for n in new_nodes)
        new_inits = [i.name for i in proto.graph.initializer if i.name not in ("B", "bias")]
        assert new_inits and all(name.startswith(PREFIX + "/") for name in new_inits)
        assert proto.graph.output[0].name == "Y"


def test_metadata_and_opset():
    r = recipe(shift="mean")
    model, *_ = linear_model()
    proto, _ = transformed(model, r)
    imports = {o.domain: o.version for o in proto.opset_import}
    assert imports["nm_onnx"] == 1 and proto.ir_version <= 10
    meta = {p.key: p.value for p in proto.metadata_props}
    assert SparsityRecipe.from_json(meta["nm_onnx.recipe"]).digest() == r.digest()
    assert meta["nm_onnx.recipe_digest"] == r.digest() and meta["nm_onnx.version"]
    onnx.checker.check_model(proto)


# ----- failed matches are explained ------------------------------------------------------------
def test_fuse_explains_each_failed_match():
    model, *_ = linear_model()
    for kw, reason in [
        ({"criterion": "clact"}, "criterion 'clact' has no fused kernel"),
        ({"shift": "static", "variance_correction": True}, "reads X before a static/learned shift"),
        ({"shift": "learned", "variance_correction": True}, "learned shift"),
    ]:
        r = recipe(**kw)
        _, rep = transformed(model, r, artifact(r) if r.shift in ("static", "learned") else None)
        assert reason in rep.fused[MODULE], (kw, rep.fused)
        assert reason.split()[0] in rep.table()


def test_fuse_explains_extra_consumer():
    # the mask output read by a second node: the pattern does not match, and says why
    model, *_ = linear_model()
    m = ir.serde.deserialize_model(model)
    run_pipeline(m, recipe(), fuse=False, check=False)
    mask = next(n for n in m.graph if n.op_type == "NMMask")
    extra = ir.node("Relu", [mask.outputs[0]], name="extra")
    m.graph.append(extra)
    m.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name = "extra_out"
    fp = FusePass()
    fp(m)
    assert "not read by exactly one MatMul" in fp.report.fused[MODULE]


def _unfused(**kw):
    model, *_ = linear_model()
    m = ir.serde.deserialize_model(model)
    r = recipe(**kw)
    run_pipeline(m, r, artifact(r) if r.shift in ("static", "learned") else None, fuse=False, check=False)
    return m, {n.op_type: n for n in m.graph}


def _extra_reader(m, value):
    extra = ir.node("Identity", [value], name="extra")
    m.graph.append(extra)
    extra.outputs[0].name = "extra_out"
    m.graph.outputs.append(extra.outputs[0])


def _non_constant(m, node, index):
    ident = ir.node("Identity", [node.inputs[index]], name="copy")
    m.graph.insert_before(node, ident)
    node.replace_input_with(index, ident.outputs[0])


def _non_constant_scale(m, nodes):
    _non_constant(m, nodes["NMMask"], 1)


def _role(m, role):
    """The output of the node insert tagged with `role` (the test knows insert's chain; fuse does not)."""
    return next(n for n in m.graph if n.metadata_props.get("nm_onnx.role") == role).outputs[0]


def _vc_reads_shifted_x(m, nodes):
    cast = next(n for n in m.graph if n.metadata_props.get("nm_onnx.role") == "vc_x_cast")
    cast.replace_input_with(0, nodes["NMMask"].inputs[0])


MEDIAN, MEDIAN_VC, STATIC = {"shift": "median"}, {"shift": "median", "variance_correction": True}, {"shift": "static"}
TAMPER = [  # (reason the report starts with, recipe, how the unfused chain is broken)
    ("channel_scale is not a constant", {"criterion": "amber"}, _non_constant_scale),
    ("the TokenShift output is read by more than the mask", MEDIAN,
     lambda m, n: _extra_reader(m, n["TokenShift"].outputs[0])),
    ("the TokenShift eta is not used only as Mul(eta, r)", MEDIAN,
     lambda m, n: _extra_reader(m, n["TokenShift"].outputs[1])),
    ("the TokenShift eta is not used only as Mul(eta, r) with a constant r", MEDIAN,
     lambda m, n: _non_constant(m, n["Mul"], 1)),
    ("Mul(eta, r) is read by more than the shift-bias Add", MEDIAN, lambda m, n: _extra_reader(m, n["Mul"].outputs[0])),
    ("the MatMul output is read by more than the shift-bias Add", MEDIAN,
     lambda m, n: _extra_reader(m, n["MatMul"].outputs[0])),
    ("the MatMul output is read by more than the shift-bias Add", STATIC,
     lambda m, n: _extra_reader(m, n["MatMul"].outputs[0])),
    ("the sparse product is read by more than the variance correction", MEDIAN_VC,
     lambda m, n: _extra_reader(m, _role(m, "shift_bias_add"))),
    ("variance correction would scale the baked static-shift bias", {**STATIC, "variance_correction": True},
     _vc_reads_shifted_x),
    (f"'{PREFIX}/vc_sqrt_output_0' of the chain is read outside it",
     {"variance_correction": True}, lambda m, n: _extra_reader(m, _role(m, "vc_sqrt"))),
    ("the NMMask output is a graph output", {}, lambda m, n: m.graph.outputs.append(n["NMMask"].outputs[0])),
]


@pytest.mark.parametrize(("reason", "kw", "tamper"), TAMPER, ids=[f"{i}-{t[0][:30]}" for i, t in enumerate(TAMPER)])
def test_fuse_explains_each_failed_check(reason, kw, tamper):
    """Every check of the fuse rule that can fail says why; the chain is then left unfused and intact."""
    m, nodes = _unfused(**kw)
    tamper(m, nodes)
    before = [n.op_type for n in m.graph]
    fp = FusePass()
    result = fp(m)
    assert fp.report.fused[MODULE].startswith(reason), fp.report.fused
    assert not result.modified
    assert [n.op_type for n in m.graph] == before


def test_locate_refuses_a_recipe_that_selects_no_site():
    """An exclude that removes every target is an error, not a silent dense 'transform'."""
    model, *_ = linear_model()
    m = ir.serde.deserialize_model(model)
    r = SparsityRecipe(name="t", pattern="4:8", targets=["model.layers.*"], exclude=["*.down_proj"]).validate()
    with pytest.raises(NmOnnxError, match="remove every target"):
        LocatePass(r)(m)


@pytest.mark.parametrize(
    "kw, cal, message",
    [
        ({"pattern": "16:64"}, False, "does not divide K=32 at site 'model.layers.0.mlp.down_proj'"),
        ({"targets": ["model.layers.*.self_attn.*"]}, False, "matches no module; available: model.layers.0.mlp.down_proj"),
        ({"pattern": "unstructured:0.5"}, False, "unstructured"),
        ({"shift": "static"}, False, "needs calibration constants static_shift"),
        ({"scale_shift": True}, False, "needs calibration constants scale_a, scale_b"),
    ],
)
def test_locate_errors(kw, cal, message):
    kw.setdefault("targets", ["model.layers.*.mlp.*"])
    r = SparsityRecipe(name="t", **kw).validate()
    model, *_ = linear_model()
    with pytest.raises(NmOnnxError, match=message.replace("(", r"\(").replace("*", r"\*")):
        transformed(model, r)


def test_missing_constant_for_a_site_is_named():
    r = recipe(shift="learned")
    cal = CalibrationArtifact(recipe=r, tensors={}, report={"sites": {"model.layers.0.mlp.down_proj": [K, O]}})
    model, *_ = linear_model()
    with pytest.raises(NmOnnxError, match="no learned_shift for site 'model.layers.0.mlp.down_proj'"):
        transformed(model, r, cal)


@pytest.mark.parametrize("report, message", [
    ({}, "calibrated on another model, not this model \\(it has site 'model.layers.9.mlp.down_proj'"),
    ({"sites": {"model.layers.0.mlp.down_proj": [K, 2 * O]}, "model": "tiny-other"},
     "calibrated on tiny-other, not this model \\('model.layers.0.mlp.down_proj' is \\[K, O\\] = \\[32, 24\\]"),
])
def test_artifact_from_another_model_is_named(report, message):
    """An artifact of another model says so, instead of 'no static_shift for layers.N'."""
    r = recipe(shift="learned")
    cal = CalibrationArtifact(recipe=r, tensors={"model.layers.9.mlp.down_proj.learned_shift": np.zeros(K, np.float32)},
                              report=report)
    model, *_ = linear_model()
    with pytest.raises(NmOnnxError, match=message):
        transformed(model, r, cal)


def test_already_transformed_is_refused():
    model, *_ = linear_model()
    once, _ = transformed(model, recipe())
    with pytest.raises(NmOnnxError, match="already transformed"):
        transformed(once, recipe())
    # metadata alone (e.g. a fused model whose ops were renamed) is enough
    model.metadata_props.add(key="nm_onnx.recipe", value="{}")
    with pytest.raises(NmOnnxError, match="already transformed"):
        transformed(model, recipe())
