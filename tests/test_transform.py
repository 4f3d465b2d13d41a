"""`transform` and `nm-onnx transform` on real optimum exports of tiny random models: every
architecture runs in ORT through the op library, the fused, unfused and portable forms agree, errors
are clear and leave nothing behind, directories stay loadable by optimum, external data stays external."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nm_onnx.calibration import CalibrationArtifact, load_artifact
from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.feeds import make_feed
from nm_onnx.graph import find_linear_sites, load_model
from nm_onnx.recipe import SparsityRecipe
from nm_onnx.runtime import make_session
from nm_onnx.transform import transform
from tests.models_cache import tiny_export

IDS = np.random.default_rng(0).integers(0, 512, size=(2, 24))


def logits(model_dir, use_library=True, optimization="all"):
    sess = make_session(model_dir, providers=["CPUExecutionProvider"], optimization=optimization,
                        use_library=use_library, threads=1)
    names = [o.name for o in sess.get_outputs()]
    return sess.run(["logits"], make_feed(sess, IDS))[0] if "logits" in names else None


def nodes(model_dir):
    m = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    return [n.op_type for n in m.graph.node]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3", "mistral"])
def test_tiny_architectures_fused_and_unfused_agree(arch, tmp_path):
    src = tiny_export(arch)
    sites = find_linear_sites(load_model(src))
    targeted = [s for s in sites if s.kind != "lm_head"]
    fused = transform(src, tmp_path / "fused", "8:16-median-variance")
    unfused = transform(src, tmp_path / "unfused", "8:16-median-variance", fuse=False)
    assert nodes(tmp_path / "fused").count("NMSparseMatMul") == len(targeted)
    assert "NMMask" not in nodes(tmp_path / "fused")
    assert nodes(tmp_path / "unfused").count("NMMask") == len(targeted)
    assert sum(c["fused"] for c in fused.passes.counts().values()) == len(targeted)
    assert sum(c["unfused"] for c in unfused.passes.counts().values()) == len(targeted)
    dense = logits(src)
    a, b = logits(tmp_path / "fused"), logits(tmp_path / "unfused")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(a - dense).max() > 1e-3  # sparsity is really applied
    for f in ("config.json", "tokenizer.json"):
        assert (tmp_path / "fused" / f).is_file()


def test_qwen2_bias_kept_after_sparse_matmul(tmp_path):
    src = tiny_export("qwen2")
    biased = [s for s in find_linear_sites(load_model(src)) if s.bias_add]
    assert biased  # q/k/v carry a bias in Qwen2
    transform(src, tmp_path / "out", "2:4-magnitude")
    m = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    producers = {o: n for n in m.graph.node for o in n.output}
    adds = [n for n in m.graph.node if n.name in {s.bias_add for s in biased}]
    assert len(adds) == len(biased)
    assert all(any(producers.get(i) is not None and producers[i].op_type == "NMSparseMatMul" for i in a.input) for a in adds)


def test_without_kv_cache_and_portable(tmp_path):
    src = tiny_export("llama", with_past=False)
    transform(src, tmp_path / "fused", "4:8-median-shift")
    transform(src, tmp_path / "portable", "4:8-median-shift", portable=True)
    a = logits(tmp_path / "fused")
    b = logits(tmp_path / "portable", use_library=False)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_calibration_artifact_static_and_scale_shift(tmp_path):
    src = tiny_export("llama")
    recipe = SparsityRecipe(name="cal", pattern="8:16", shift="static", scale_shift=True).validate()
    sites = [s for s in find_linear_sites(load_model(src)) if s.kind != "lm_head"]
    rng = np.random.default_rng(0)
    tensors = {}
    for s in sites:
        tensors[f"{s.module}.static_shift"] = np.array([0.05], np.float32)
        tensors[f"{s.module}.scale_a"] = (0.05 * rng.standard_normal(s.o)).astype(np.float32)
        tensors[f"{s.module}.scale_b"] = (0.05 * rng.standard_normal(s.o)).astype(np.float32)
    CalibrationArtifact(recipe=recipe, tensors=tensors).save(tmp_path / "art")
    art = load_artifact(tmp_path / "art")
    transform(src, tmp_path / "f", tmp_path / "art", calibration=tmp_path / "art")
    transform(src, tmp_path / "u", recipe, calibration=art, fuse=False)
    np.testing.assert_allclose(logits(tmp_path / "f"), logits(tmp_path / "u"), rtol=1e-4, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "f" / "model.onnx")).metadata_props}
    assert meta["nm_onnx.calibration_digest"] == art.digest()


def test_model_file_with_external_data_stays_external(tmp_path):
    src = tiny_export("llama")
    m = onnx.load(str(src / "model.onnx"))
    onnx.save(m, str(tmp_path / "dense.onnx"), save_as_external_data=True, location="dense.onnx.data",
              size_threshold=1024)
    transform(tmp_path / "dense.onnx", tmp_path / "sparse.onnx", "8:16-amber")
    assert (tmp_path / "sparse.onnx_data").stat().st_size > (tmp_path / "sparse.onnx").stat().st_size
    sess = make_session(tmp_path / "sparse.onnx", providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], make_feed(sess, IDS))[0].shape == (2, 24, 512)


def test_constants_in_external_data_are_carried_over(tmp_path):
    """Exports too big for optimum's post-processing keep Constant values in the external data file too;
    the output must not refer to them in its own (same-named) data file: identical logits."""
    from onnx.external_data_helper import convert_model_to_external_data

    src = tiny_export("llama")
    m = onnx.load(str(src / "model.onnx"))
    convert_model_to_external_data(m, location="model.onnx_data", size_threshold=0, convert_attribute=True)
    d = tmp_path / "dense"
    d.mkdir()
    onnx.save(m, str(d / "model.onnx"))
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    assert any(a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL
               for n in m.graph.node for a in n.attribute)
    transform(d, tmp_path / "a", "8:16-magnitude")  # dir out: model.onnx + model.onnx_data, as the source
    transform(src, tmp_path / "b", "8:16-magnitude")
    np.testing.assert_array_equal(logits(tmp_path / "a"), logits(tmp_path / "b"))


def test_errors_leave_nothing_behind(tmp_path):
    src = tiny_export("llama")
    with pytest.raises(NmOnnxError, match="does not divide K=64 at site 'model.layers.0.self_attn.q_proj'"):
        transform(src, tmp_path / "out", SparsityRecipe(name="x", pattern="32:48").validate())
    assert list(tmp_path.iterdir()) == []
    transform(src, tmp_path / "once", "2:4-magnitude")
    with pytest.raises(NmOnnxError, match="already transformed"):
        transform(tmp_path / "once", tmp_path / "twice", "2:4-magnitude")
    assert not (tmp_path / "twice").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once"]


def test_optimum_loads_the_output_directory(tmp_path):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    from nm_onnx.ops import register_library

    transform(tiny_export("llama"), tmp_path / "out", "8:16-median-shift")
    so = ort.SessionOptions()
    register_library(so)
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "out", session_options=so, provider="CPUExecutionProvider")
    import torch

    out = model.generate(torch.tensor(IDS[:1, :8]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nm_onnx", "transform", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=300)


def test_cli_table_and_errors(tmp_path):
    src = tiny_export("llama")
    p = run_cli(src / "model.onnx", tmp_path / "s.onnx", "--recipe", "8:16-clact")
    assert p.returncode == 0, p.stderr
    assert "total" in p.stdout and "criterion 'clact' has no fused kernel" in p.stdout
    assert (tmp_path / "s.onnx").is_file()
    p = run_cli(tmp_path / "s.onnx", tmp_path / "t.onnx", "--recipe", "8:16-clact")
    assert p.returncode == 2 and "already transformed" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(src, tmp_path / "u", "--recipe", "8:16-static-shift")
    assert p.returncode == 2 and "needs calibration constants static_shift" in p.stderr
    p = run_cli(src, tmp_path / "j", "--recipe", "2:4-variance", "--no-fuse", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["fuse"] is False


def test_torch_dynamo_export(tmp_path):
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Linear(32, 64, bias=False)
            self.down_proj = torch.nn.Linear(64, 32, bias=True)

        def forward(self, x):
            return self.down_proj(torch.relu(self.up_proj(x)))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, x):
            return x + self.mlp(x)

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, x):
            return self.model(x)

    torch.manual_seed(0)
    model = Top().eval()
    x = torch.randn(2, 5, 32)
    torch.onnx.export(model, (x,), dynamo=True).save(str(tmp_path / "dyn.onnx"))
    recipe = SparsityRecipe(name="d", pattern="8:16", shift="median", targets=["model.layers.*.mlp.*"]).validate()
    transform(tmp_path / "dyn.onnx", tmp_path / "f.onnx", recipe)
    transform(tmp_path / "dyn.onnx", tmp_path / "u.onnx", recipe, fuse=False)
    m = onnx.load(str(tmp_path / "f.onnx"))
    fused = [n for n in m.graph.node if n.op_type == "NMSparseMatMul"]
    assert len(fused) == 4 and all(n.name.startswith("/model.layers.") for n in fused)
    outs = []
    for name in ("f.onnx", "u.onnx"):
        sess = make_session(tmp_path / name, providers=["CPUExecutionProvider"], optimization="none")
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)

    from nm_onnx.reference import sparse_linear

    with torch.no_grad():
        h = x
        for layer in model.model.layers:
            kw = {"n": 8, "m": 16, "shift": "median"}
            u = torch.relu(sparse_linear(h, layer.mlp.up_proj.weight, None, **kw))
            h = h + sparse_linear(u, layer.mlp.down_proj.weight, layer.mlp.down_proj.bias, **kw)
    np.testing.assert_allclose(outs[0], h.numpy(), rtol=1e-4, atol=1e-4)


def test_external_data_writer_round_trip(tmp_path, monkeypatch):
    """save_model's own data writer (aligned offsets, two buffers, O_DIRECT where possible): the bytes
    of external and in-memory tensors come back identical, small tensors stay inline."""
    import onnx_ir as ir
    from onnx import numpy_helper

    import nm_onnx.graph.save as tr

    monkeypatch.setattr(tr, "_COPY_CHUNK", 8192)  # several pieces per tensor, padded last piece
    rng = np.random.default_rng(0)
    arrays = {"big": rng.standard_normal(3 * 2048 + 25).astype(np.float32),  # 3 pieces + a short one
              "mid": rng.standard_normal((50, 100)).astype(np.float16),
              "small": np.arange(10, dtype=np.int64)}
    src = ir.Model(ir.Graph([], [], nodes=[], initializers=[
        ir.Value(name="big", const_value=ir.tensor(arrays["big"], name="big"))]), ir_version=10)
    ir.save(src, tmp_path / "src.onnx", external_data="src.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "src.onnx")  # "big" is an ExternalTensor now
    for name in ("mid", "small"):
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(arrays[name], name=name)))
    tr.save_model(model, tmp_path / "out" / "m.onnx", external=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx_data"]
    proto = onnx.load(str(tmp_path / "out" / "m.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer}
    assert where["small"] == {} and all(int(where[n]["offset"]) % 4096 == 0 for n in ("big", "mid"))
    size = (tmp_path / "out" / "m.onnx_data").stat().st_size
    assert size == max(int(w["offset"]) + int(w["length"]) for w in where.values() if w)
    onnx.load_external_data_for_model(proto, str(tmp_path / "out"))
    for t in proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), arrays[t.name])
    assert isinstance(model.graph.initializers["big"].const_value, ir.ExternalTensor)  # model left as it was
    assert model.graph.initializers["big"].const_value.path == str(tmp_path / "src.data")


def test_external_input_error_leaves_nothing_behind(tmp_path):
    """The weights of an external-data input are copied to a staging file while the passes run; an
    error in the passes removes it (and writes nothing at OUT)."""
    src = tiny_export("llama")
    m = onnx.load(str(src / "model.onnx"))
    (tmp_path / "in").mkdir()
    onnx.save(m, str(tmp_path / "in" / "dense.onnx"), save_as_external_data=True, location="dense.onnx.data",
              size_threshold=1024)
    (tmp_path / "out").mkdir()
    with pytest.raises(NmOnnxError, match="does not divide K=64 at site"):
        transform(tmp_path / "in" / "dense.onnx", tmp_path / "out" / "s.onnx", SparsityRecipe(name="x", pattern="32:48").validate())
    assert list((tmp_path / "out").iterdir()) == []
    transform(tmp_path / "in" / "dense.onnx", tmp_path / "out" / "s.onnx", "8:16-median-shift")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.onnx", "s.onnx_data"]
    dense = onnx.load(str(tmp_path / "in" / "dense.onnx"))
    sparse = onnx.load(str(tmp_path / "out" / "s.onnx"))
    weights = {t.name: t.raw_data for t in sparse.graph.initializer}
    assert all(weights[t.name] == t.raw_data for t in dense.graph.initializer)
