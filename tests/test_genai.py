"""ORT GenAI as a deployment target (docs/genai.md), on real model-builder output and the real og runtime.

Tiny random Llama and Qwen2 models are built by ORT GenAI's model builder (its own environment,
.venv-genai; cached by content, tests/models_cache.tiny_genai), transformed, loaded by `og.Model`
and decoded greedily; og's tokens are compared with a plain ORT session's greedy loop over the same
model.onnx (through nm_onnx.runtime and the op library) and with the PyTorch reference simulation of the
recipe (test_og_generates_the_tokens_of_the_pytorch_reference), the dense model's tokens likewise, and the
packed sites' masks (one qkv_proj / gate_up_proj MatMul = one mask for the packed projections) with
the PyTorch reference's mask of the activation each site received.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SHARED_CALIBRATED, error_lines, needs_library, run_cli
from models_cache import tiny_genai, tiny_hf

from nm_onnx import genai
from nm_onnx.errors import NmOnnxError

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (extra `genai`)")


def _has_builder() -> bool:
    try:
        genai.builder_python()
    except NmOnnxError:
        return False
    return True


needs_builder = pytest.mark.skipif(not _has_builder(), reason="no ORT GenAI builder environment: `make genai-env`")
pytestmark = [pytest.mark.genai, needs_builder]

PROMPT = [5, 17, 99, 3, 42, 7, 301, 12]
NEW = 16


def og_greedy(directory, prompt=PROMPT, new=NEW) -> list[int]:
    """Greedy continuation by og.Generator (the directory's own genai_config.json)."""
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):]


def ort_greedy(directory, prompt=PROMPT, new=NEW) -> tuple[list[int], np.ndarray]:
    """(greedy continuation, prompt logits) of a plain ORT session over the directory's model.onnx."""
    from nm_onnx.evaluation.feeds import make_feed, present_to_past
    from nm_onnx.runtime import make_session

    sess = make_session(directory, providers=["CPUExecutionProvider"])
    out = sess.run(None, make_feed(sess, np.array([prompt])))
    first = out[0]
    toks = list(prompt)
    for _ in range(new):
        toks.append(int(out[0][0, -1].argmax()))
        out = sess.run(None, make_feed(sess, np.array([[toks[-1]]]), present_to_past(sess, out), len(toks) - 1))
    return toks[len(prompt):], first


def test_builder_sites_packed_qkv_and_gate_up():
    """The builder's linear sites: module paths from its node names (attn -> self_attn), packed kinds."""
    from nm_onnx.graph import find_linear_sites, load_model

    sites = find_linear_sites(load_model(genai.decoder_file(tiny_genai("llama"))))
    got = [(s.module, s.kind, s.k, s.o) for s in sites if s.layer == 0]
    assert got == [
        ("model.layers.0.self_attn.qkv_proj", "qkv", 64, 128),  # q 64 + k 32 + v 32 (2 KV heads)
        ("model.layers.0.self_attn.o_proj", "o", 64, 64),
        ("model.layers.0.mlp.gate_proj", "gate", 64, 128),
        ("model.layers.0.mlp.up_proj", "up", 64, 128),
        ("model.layers.0.mlp.down_proj", "down", 128, 64),
    ]
    assert sites[0].matmul == "/model/layers.0/attn/qkv_proj/MatMul"
    assert (sites[-1].module, sites[-1].kind) == ("lm_head", "lm_head")
    packed = find_linear_sites(load_model(genai.decoder_file(tiny_genai("llama", fuse_mlp_gate_up=True))))
    assert [(s.module, s.kind, s.o) for s in packed if s.layer == 1 and s.kind.startswith("gate")] == [
        ("model.layers.1.mlp.gate_up_proj", "gate_up", 256)]


@needs_library
@pytest.mark.parametrize("arch,recipe,extra", [
    ("llama", "8:16-magnitude", {}),
    ("llama", "8:16-median-shift", {"fuse_mlp_gate_up": True}),
    ("qwen2", "8:16-median-shift", {}),
    ("qwen2-bias", "8:16-median-shift", {}),  # the packed q/k/v bias Add stays behind the fused site
    ("mistral", "8:16-median-shift+shared", {}),  # gate/up packed by transform's pack pass
])
def test_transformed_genai_dir_generates_in_og_like_ort(tmp_path, arch, recipe, extra):
    from nm_onnx.transform import transform

    dense = tiny_genai(arch, **extra)
    out = tmp_path / "sparse"
    report = transform(dense, out, recipe)
    assert report.passes.fused and len(report.passes.fused) == sum(1 for s in report.passes.sites
                                                                   if s["action"] == "sparse")
    cfg = json.loads((out / genai.CONFIG).read_text())
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == "libnm_onnx_ops.so"
    assert (out / "libnm_onnx_ops.so").is_file() and (out / "tokenizer.json").is_file()

    dense_og, (dense_ort, dense_logits) = og_greedy(dense), ort_greedy(dense)
    sparse_og, (sparse_ort, sparse_logits) = og_greedy(out), ort_greedy(out)
    assert dense_og == dense_ort  # the harness: og and a plain session decode alike
    assert sparse_og == sparse_ort  # og runs our kernels exactly like a plain ORT session does
    assert np.abs(sparse_logits - dense_logits).max() > 1e-3  # the sites are really sparse
    if arch == "qwen2-bias":
        from nm_onnx.graph import find_linear_sites, load_model

        qkv = [s for s in find_linear_sites(load_model(genai.decoder_file(dense))) if s.kind == "qkv"]
        assert qkv and all(s.bias == f"model.layers.{s.layer}.attn.qkv_proj.Add.bias" for s in qkv)
    print(f"{arch} {recipe}: dense {dense_og[:8]} sparse {sparse_og[:8]}")


@needs_library
def test_og_refuses_the_sparse_model_without_the_library(tmp_path):
    """Control: without the library entry og cannot load the sparse model (so the test above used it)."""
    from nm_onnx.transform import transform

    out = tmp_path / "sparse"
    transform(tiny_genai("llama"), out, "8:16-magnitude")
    cfg = json.loads((out / genai.CONFIG).read_text())
    del cfg["model"]["decoder"]["session_options"]["custom_ops_library"]
    (out / genai.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="NMSparseMatMul"):
        og.Model(str(out))


def _exposed(directory, names):
    """A plain ORT session (op library registered) on a directory's model with `names` as extra outputs."""
    import onnxruntime as ort

    from nm_onnx import ops

    proto = onnx.load(str(genai.decoder_file(directory)))  # tiny: the weights are loaded
    for name in names:
        proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    so = ort.SessionOptions()
    ops.register_library(so)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.nm_onnx_head_size = genai.head_size(directory)
    return sess, proto


@needs_library
@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"fuse_mlp_gate_up": True}), ("qwen2-bias", {}),
                                        ("qwen2", {"precision": "int4", "is_symmetric": False})])
def test_packed_site_masks_equal_the_reference(tmp_path, arch, extra):
    """Every site's mask (unfused: the NMMask output) is the PyTorch reference's mask of the activation
    it received, and a fused site's output is the reference sparse_linear on the site's weight (packed
    q/k/v; for a quantized site its dequantized MatMulNBits weight: validate (b) on the graph's own weights)."""
    import torch

    from nm_onnx.evaluation.feeds import make_feed
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.passes.record import site_records
    from nm_onnx.reference import functional as F
    from nm_onnx.transform import transform

    dense = tiny_genai(arch, **extra)
    from nm_onnx.graph.constants import load_weight

    dense_model = load_model(genai.decoder_file(dense))
    weights = {s.module: (load_weight(dense_model, s), s.bias) for s in find_linear_sites(dense_model)}
    window = np.random.default_rng(0).integers(3, 500, size=(1, 24))
    for fuse in (False, True):
        out = tmp_path / f"sparse-{fuse}"
        transform(dense, out, "8:16-median-shift", fuse=fuse)
        records = site_records(onnx.load(str(genai.decoder_file(out)), load_external_data=False))
        packed = [r for r in records if r["kind"] in ("qkv", "gate_up")]
        assert packed and all(r["fused"] == fuse for r in records)
        by_name = {n.name: n for n in onnx.load(str(genai.decoder_file(out)), load_external_data=False).graph.node}
        names, masks = [], {}
        for r in records:
            node = next(by_name[x] for x in r["nodes"]
                        if by_name[x].op_type in ("NMMask", "NMSparseMatMul", "NMSparseMatMulNBits"))
            masks[r["module"]] = node.output[0]
            names += [r["input"], node.output[0], r["output"]]
        sess, proto = _exposed(out, sorted(set(names)))
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, make_feed(sess, window))))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        for r in records:
            x = torch.from_numpy(res[r["input"]])
            xc = x - F.token_median(x)
            ref_mask = (F.nm_mask(F.selection_scores(xc, "magnitude", None), 8, 16) & (xc != 0)).numpy()
            if not fuse:
                np.testing.assert_array_equal(res[masks[r["module"]]] != 0, ref_mask, err_msg=r["module"])
            else:
                from nm_onnx.validate import library_mask

                node = next(by_name[x] for x in r["nodes"] if by_name[x].op_type.startswith("NMSparseMatMul"))
                np.testing.assert_array_equal(library_mask(node, res[r["input"]], inits), ref_mask,
                                              err_msg=r["module"])
                weight, bias = weights[r["module"]]
                w = torch.from_numpy(np.array(weight, dtype=np.float32))
                b = torch.from_numpy(inits[bias]) if bias else None
                y = F.sparse_linear(x, w, b, n=8, m=16, shift="median").numpy()
                got = res[r["output"]]
                assert np.abs(got - y).max() <= 1e-5 * np.abs(y).max(), r["module"]
        assert {r["kind"] for r in packed} == ({"qkv", "gate_up"} if "fuse_mlp_gate_up" in extra else {"qkv"})


@needs_library
@pytest.mark.parametrize("arch,extra", [
    ("llama", {"precision": "int4"}),  # the builder's default: symmetric, block 32
    ("qwen2", {"precision": "int4", "is_symmetric": False, "block_size": 64}),  # zero points
    ("llama", {"precision": "int8"}),
])
def test_quantized_genai_dir_generates_in_og_like_ort(tmp_path, arch, extra):
    """MatMulNBits sites become NMSparseMatMulNBits over the same quantized weights; og decodes them
    through our kernels like a plain ORT session does."""
    from nm_onnx.passes.record import site_records
    from nm_onnx.transform import transform

    dense = tiny_genai(arch, **extra)
    proto = onnx.load(str(genai.decoder_file(dense)), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in proto.graph.node)
    out = tmp_path / "sparse"
    report = transform(dense, out, "8:16-median-shift")
    sparse_sites = [s for s in report.passes.sites if s["action"] == "sparse"]
    assert sparse_sites and all(report.passes.fused[s["module"]] == "fused" for s in sparse_sites)
    records = site_records(onnx.load(str(genai.decoder_file(out)), load_external_data=False))
    bits = 8 if extra["precision"] == "int8" else 4
    assert {r["op"] for r in records} == {"NMSparseMatMulNBits"}
    assert all(r["quant"] == {"bits": bits, "block_size": extra.get("block_size", 32),
                              "symmetric": extra.get("is_symmetric", True)} for r in records)
    dense_og, (dense_ort, dense_logits) = og_greedy(dense), ort_greedy(dense)
    sparse_og, (sparse_ort, sparse_logits) = og_greedy(out), ort_greedy(out)
    assert dense_og == dense_ort
    assert sparse_og == sparse_ort
    assert np.abs(sparse_logits - dense_logits).max() > 1e-3


def test_export_cli_genai_and_its_errors(tmp_path):
    src = tiny_hf("llama")
    r = run_cli("export", src, tmp_path / "g", "--format", "genai")
    assert r.returncode == 0, r.stderr
    assert "builder: Reading layer 1" in r.stderr and ".nm-onnx-partial" not in r.stderr
    got = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert got == ["genai_config.json", "model.onnx", "model.onnx.data", "nm_onnx_export.json",
                   "nm_onnx_manifest.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "g" / "nm_onnx_export.json").read_text())["precision"] == "fp32"
    assert og_greedy(tmp_path / "g") == og_greedy(tiny_genai("llama"))  # the same builder, the same model
    cases = [
        (["--format", "genai", "--no-past"], {}, "--no-past and --opset apply to --format optimum only"),
        (["--precision", "fp16"], {}, "--precision applies to --format genai only"),
        (["--format", "genai"], {genai.BUILDER_ENV_VAR: str(tmp_path / "nope")}, "make genai-env"),
    ]
    for args, env, message in cases:
        r = run_cli("export", src, tmp_path / "x", *args, env=env)
        assert r.returncode == 2, r.stderr
        (line,) = error_lines(r.stderr)
        assert message in line
    r = run_cli("export", src, tmp_path / "x", "--format", "genai", "--precision", "int2")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    # an existing folder of someone else's files is kept
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = run_cli("export", src, tmp_path / "mine", "--format", "genai")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@needs_library
def test_genai_transform_cli_output_replaces_only_its_own(tmp_path):
    dense = tiny_genai("llama")
    r = run_cli("transform", dense, tmp_path / "s", "--recipe", "8:16-magnitude")
    assert r.returncode == 0, r.stderr
    assert "qkv" in r.stdout
    r = run_cli("transform", dense, tmp_path / "s", "--recipe", "8:16-median-shift")
    assert r.returncode == 0, r.stderr
    copy = tmp_path / "copy"
    shutil.copytree(dense, copy)
    cfg = json.loads((copy / genai.CONFIG).read_text())
    cfg["model"]["decoder"]["session_options"]["custom_ops_library"] = "libother.so"
    (copy / genai.CONFIG).write_text(json.dumps(cfg))
    r = run_cli("transform", copy, tmp_path / "t", "--recipe", "8:16-magnitude")
    assert r.returncode == 2 and "libother.so" in r.stderr and not (tmp_path / "t").exists()
    assert Path(tmp_path / "s" / "libnm_onnx_ops.so").is_file()


def test_evaluate_genai_dir_equals_the_optimum_export():
    """Perplexity of a GenAI directory through a plain ORT session (its own tokenizer files, written by
    the builder's transformers 5) equals the optimum export's of the same model on the same windows."""
    from models_cache import tiny_export

    from nm_onnx.evaluate import evaluate

    kw = {"seqlen": 48, "limit": 3, "threads": 1}
    got = evaluate(tiny_genai("llama"), **kw)["perplexity"]
    ref = evaluate(tiny_export("llama"), **kw)["perplexity"]
    assert got["tokens"] == ref["tokens"] == 3 * 47
    assert abs(got["perplexity"] / ref["perplexity"] - 1) < 1e-4, (got, ref)


def test_lm_eval_batch_on_a_genai_dir_equals_batch_one():
    """GenAI's GroupQueryAttention refuses a past with several new tokens at batch > 1, so the lm-eval
    adapter scores shared contexts of a GenAI graph on the padded path: batch 4 runs, equals batch 1."""
    from nm_onnx.evaluation.lm_eval_adapter import NmOnnxLM
    from nm_onnx.runtime import make_session

    d = tiny_genai("llama")
    sess = make_session(d)
    reqs = [(("", ""), context, cont) for context in ([5, 17, 42, 99, 7, 8], [300, 301, 302])
            for cont in ([3], [9, 10], [11, 12, 13])]
    lms = [NmOnnxLM(session=sess, tokenizer=str(d), batch_size=bs) for bs in (1, 4)]
    assert lms[1]._shared_contexts(reqs) == ([], list(range(len(reqs))))
    one, four = (lm._loglikelihood_tokens(reqs, disable_tqdm=True) for lm in lms)
    for (a, ga), (b, gb) in zip(one, four):
        assert abs(a - b) < 1e-4 and ga == gb


def test_packed_site_without_shared_selection_is_refused(tmp_path, shared_artifact):
    """A packed site has one mask for its projections: per-projection constants (amber, learned shift)
    need share_selection, an artifact made without it is refused (one line, exit 2, nothing written)."""
    from nm_onnx.calibration.artifact import CalibrationArtifact
    from nm_onnx.recipe import SparsityRecipe
    from nm_onnx.transform import transform

    # the artifact's shared constants, relabelled as a recipe without share_selection
    d = dict(SHARED_CALIBRATED, share_selection=False)
    art = CalibrationArtifact(SparsityRecipe.from_dict(d), shared_artifact.tensors, shared_artifact.report)
    tampered = dict(shared_artifact.tensors)
    k_scale = "model.layers.0.self_attn.k_proj.channel_scale"
    tampered[k_scale] = tampered[k_scale] * 2
    bad = CalibrationArtifact(shared_artifact.recipe, tampered, shared_artifact.report)
    genai_dir = tiny_genai("llama")
    with pytest.raises(NmOnnxError, match=r"packs .*q_proj, k_proj, v_proj into one MatMul .* '8:16-amber\+shared'"):
        transform(genai_dir, tmp_path / "a", "8:16-amber")
    with pytest.raises(NmOnnxError, match=r"criterion wanda is per projection unless .*: set \"share_selection\": true in recipe 'shared-cal'"):
        transform(genai_dir, tmp_path / "b", art.recipe, calibration=art)
    with pytest.raises(NmOnnxError, match=r"'channel_scale' differs between them: .* \"share_selection\": true"):
        transform(genai_dir, tmp_path / "c", bad.recipe, calibration=bad)
    assert not any((tmp_path / x).exists() for x in "abc")
    r = run_cli("transform", genai_dir, tmp_path / "d", "--recipe", "8:16-wanda")
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "8:16-wanda+shared" in r.stderr


@pytest.mark.parametrize("extra", [{}, {"fuse_mlp_gate_up": True}])
def test_calibrated_shared_recipe_on_packed_sites(tmp_path, extra, shared_artifact):
    """A shared recipe's artifact (channel factors, learned shift, scale_shift per projection) on the
    builder's packed qkv_proj (and gate_up_proj, or gate/up that transform packs itself): validate's
    checks hold, and og.Generator decodes like a plain ORT session."""
    from nm_onnx.transform import transform
    from nm_onnx.validate import validate

    dense, out, art = tiny_genai("llama", **extra), tmp_path / "sparse", shared_artifact
    report = transform(dense, out, art.recipe, calibration=art)
    assert sorted(s["kind"] for s in report.passes.sites if s["action"] == "sparse") == [
        "down", "down", "gate_up", "gate_up", "o", "o", "qkv", "qkv"]
    assert set(report.passes.packed.values()) == (set() if extra else {"packed"})
    result = validate(dense, out, tiny_hf("llama"), art.recipe, calibration=art.path, checks="abc", seqlen=48, limit=1)
    assert all(r.status == "PASS" for r in result.results), [r.line() for r in result.results]
    sparse_og, (sparse_ort, _) = og_greedy(out), ort_greedy(out)
    assert sparse_og == sparse_ort


@needs_library
def test_bench_on_genai_dirs_and_its_context(tmp_path):
    """`nm-onnx bench` times a GenAI pair in plain sessions; the context comes from genai_config.json."""
    from nm_onnx.transform import transform

    dense = tiny_genai("llama")
    transform(dense, tmp_path / "s", "8:16-magnitude")
    r = run_cli("bench", tmp_path / "s", "--baseline", dense, "--prompt", "16", "--decode", "4", "--repeats", "1",
                "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["results"]) == {"model", "baseline"} and res["decode_speedup"] > 0
    r = run_cli("bench", tmp_path / "s", "--prompt", "250", "--decode", "16")
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert "exceeds the model's context of 256 tokens" in line


@pytest.mark.slow
def test_smollm2_genai_export_og_tokenizer_and_generation(tmp_path):
    """SmolLM2-135M: builder export, og.Tokenizer ids equal the Hugging Face tokenizer's (byte_fallback
    dropped from the byte-level BPE), dense og continues "The capital of France is" with " Paris.", and
    the 8:16-median-shift transform generates through og like a plain ORT session."""
    from nm_onnx.evaluation.tokenizer import load_tokenizer
    from nm_onnx.models import resolve_model
    from nm_onnx.transform import transform

    dense = tmp_path / "g"
    r = run_cli("export", "smollm2-135m", dense, "--format", "genai")
    assert r.returncode == 0, r.stderr
    assert "without byte_fallback" in r.stderr
    hf = load_tokenizer(resolve_model("smollm2-135m"))
    text = "The capital of France is Paris.  Hello   world\n\n = Valkyria = café 日本語"
    model = og.Model(str(dense))
    tok = og.Tokenizer(model)
    ids = [int(t) for t in tok.encode(text)]
    assert ids == hf(text)["input_ids"] and tok.decode(ids) == text
    prompt = hf("The capital of France is")["input_ids"]
    del model
    assert hf.decode(og_greedy(dense, prompt, 3)).startswith(" Paris.")
    transform(dense, tmp_path / "s", "8:16-median-shift")
    assert og_greedy(tmp_path / "s", prompt, 8) == ort_greedy(tmp_path / "s", prompt, 8)[0]


@needs_library
def test_validate_on_genai_dirs_fp32_and_int4(tmp_path):
    """`validate` takes GenAI directories: a packed site (qkv_proj) is checked against its q/k/v modules
    (one input, their outputs concatenated, one mask); an int4 build's sites against the reference on
    the dequantized weights, exactly; the logits checks of the int4 build say why they cannot hold."""
    from nm_onnx.transform import transform
    from nm_onnx.validate import validate

    hf = tiny_hf("llama")
    got = {}
    for precision in ("fp32", "int4"):
        dense = tiny_genai("llama", precision=precision)
        out = tmp_path / precision
        transform(dense, out, "8:16-median-shift")
        report = validate(dense, out, hf, "8:16-median-shift", checks="abc", seqlen=48, limit=1)
        got[precision] = {r.check: r for r in report.results}
    fp32, int4 = got["fp32"], got["int4"]
    assert all(r.status == "PASS" for r in fp32.values()), [r.line() for r in fp32.values()]
    assert fp32["b"].details["sites"] == 10 and "qkv_proj" in fp32["b"].details["per_site"][0]["site"]
    assert int4["b"].status == "PASS" and int4["b"].details["sites_with_mask_mismatch"] == 0
    assert int4["b"].value <= 1e-5
    for check in ("a", "c"):  # int8 activations of the dense int4 lm_head (and int4 weights in (a))
        assert int4[check].status == "FAIL"
        assert "accuracy_level 4 (int8 activations)" in int4[check].details["failures"][0]


@needs_library
@pytest.mark.parametrize("arch,recipe", [("llama", "8:16-median-variance"), ("qwen2", "8:16-median-shift+shared")])
def test_prefill_dispatch_in_og(tmp_path, arch, recipe):
    """--prefill-dispatch on a builder graph (GroupQueryAttention, packed qkv inside the If): og loads it
    and decodes the same tokens as the plain transform output and as a plain ORT session; validate (b)
    holds on both forms of the packed sites."""
    from nm_onnx.transform import transform
    from nm_onnx.validate import validate

    dense = tiny_genai(arch)
    plain, disp = tmp_path / "plain", tmp_path / "disp"
    transform(dense, plain, recipe)
    report = transform(dense, disp, recipe, prefill_dispatch=2)
    assert report.passes.dispatch["sites"] == sum(1 for s in report.passes.sites if s["action"] == "sparse")
    want = og_greedy(plain)
    assert og_greedy(disp) == want == ort_greedy(disp)[0]
    result = validate(dense, disp, tiny_hf(arch), recipe, checks="b", seqlen=48, limit=1)
    assert [r.status for r in result.results] == ["PASS", "PASS"], [r.line() for r in result.results]


def torch_greedy(hf_dir, recipe, prompt=PROMPT, new=NEW) -> list[int]:
    """Greedy continuation of the PyTorch reference simulation of `recipe` (every step a full forward)."""
    import torch

    from nm_onnx.models import load_hf_model
    from nm_onnx.reference import sparsify_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = load_hf_model(hf_dir)
        sparsify_model(model, recipe)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(new):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        torch.set_num_threads(threads)
    return ids[len(prompt):]


@needs_library
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_og_generates_the_tokens_of_the_pytorch_reference(tmp_path, arch):
    """The builder's model, transformed (packed qkv: one mask, which the reference's q, k and v choose
    alike for a recipe without per-projection factors), decodes in og.Generator the tokens the PyTorch
    simulation of the recipe decodes, with and without --prefill-dispatch."""
    from nm_onnx.transform import transform

    recipe = "8:16-median-shift"
    want = torch_greedy(tiny_hf(arch), recipe)
    assert want != og_greedy(tiny_genai(arch))  # the dense model continues otherwise: the sites matter
    for name, extra in (("plain", {}), ("dispatch", {"prefill_dispatch": 2})):
        transform(tiny_genai(arch), tmp_path / name, recipe, **extra)
        assert og_greedy(tmp_path / name) == want, name
