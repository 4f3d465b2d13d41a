"""Foundation: embedded model, optimum export, ir_version, inspect site map, CLI errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import run_cli
from models_cache import smollm2_export, tiny_export, tiny_hf

from nm_onnx.graph import find_linear_sites, load_model

PROJ = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def smol_dir():
    return smollm2_export()


def test_smollm2_ort_logits_match_torch(smol_dir):
    """ORT logits of the exported SmolLM2 equal PyTorch's on a 128-token real-text prompt."""
    import torch

    from nm_onnx.data import load_eval_text, tokenize
    from nm_onnx.evaluation.feeds import make_feed
    from nm_onnx.models import load_hf_model
    from nm_onnx.runtime import make_session

    model, tok = load_hf_model("smollm2-135m")
    ids = tokenize(tok, load_eval_text("wikitext2").text[:4000])[:128]
    assert ids.shape == (128,)
    with torch.inference_mode():
        ref = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.numpy()
    sess = make_session(smol_dir, use_library=False)
    got = sess.run(["logits"], make_feed(sess, ids[None]))[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_smollm2_tokenizer_fixed():
    """The GGUF's tokenizer flags win over transformers' conversion: no BOS, EOS = <|im_end|>."""
    from nm_onnx.models import load_hf_model

    _, tok = load_hf_model("smollm2-135m")
    ids = tok("Hello world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]) != "<|im_start|>"
    assert tok.eos_token == "<|im_end|>"


def test_export_ir_version_accepted_by_ort(smol_dir):
    import onnxruntime as ort  # noqa: F401  (the pinned one)

    m = onnx.load(str(smol_dir / "model.onnx"), load_external_data=False)
    assert m.ir_version <= 10
    assert m.ir_version == onnx.helper.find_min_ir_version_for(list(m.opset_import), ignore_unknown=True)


def test_inspect_smollm2_sites(smol_dir):
    sites = find_linear_sites(load_model(smol_dir))
    counts = Counter(s.kind for s in sites)
    assert {k: counts[k] for k in PROJ} == {k: 30 for k in PROJ}
    assert counts["lm_head"] == 1 and len(sites) == 211
    expected_ko = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
                   "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576), "lm_head": (576, 49152)}
    for s in sites:
        assert (s.k, s.o) == expected_ko[s.kind], s
    layers = {s.layer for s in sites if s.kind in PROJ}
    assert layers == set(range(30))
    assert sites[0].module == "model.layers.0.self_attn.q_proj"
    lm = [s for s in sites if s.kind == "lm_head"][0]
    assert lm.transposed and lm.via == ("Transpose",)  # tied: reads Transpose(embedding)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_inspect_tiny_exports(arch):
    """Tiny random Qwen2 (q/k/v with bias) and Gemma3 exports give the full site map."""
    sites = find_linear_sites(load_model(tiny_export(arch)))
    counts = Counter(s.kind for s in sites)
    assert {k: counts[k] for k in PROJ} == {k: 2 for k in PROJ}
    hidden, mlp = 64, 128
    by_kind = {s.kind: s for s in sites}
    assert (by_kind["gate"].k, by_kind["gate"].o) == (hidden, mlp)
    assert (by_kind["down"].k, by_kind["down"].o) == (mlp, hidden)
    if arch == "qwen2":
        assert all(s.bias for s in sites if s.kind in ("q", "k", "v"))
        assert not any(s.bias for s in sites if s.kind in ("o", "gate", "up", "down"))


def test_inspect_dynamo_export_matches_optimum(tmp_path):
    """Module paths of a torch dynamo export (name_scopes metadata) equal the optimum export's."""
    import torch

    from nm_onnx.models import load_hf_model

    model, _ = load_hf_model(tiny_hf("llama"))
    ids = torch.randint(0, 500, (1, 8))
    prog = torch.onnx.export(model, (ids,), kwargs={"use_cache": False}, dynamo=True, optimize=False)
    prog.save(str(tmp_path / "dyn.onnx"))
    dyn = find_linear_sites(load_model(tmp_path / "dyn.onnx"))
    opt = find_linear_sites(load_model(tiny_export("llama")))
    assert [s.module for s in dyn] == [s.module for s in opt]
    assert [(s.k, s.o, s.kind) for s in dyn] == [(s.k, s.o, s.kind) for s in opt]
    assert not any(s.matmul.startswith("/") for s in dyn)  # really the dynamo naming scheme


def test_export_no_past_and_cli_inspect_json(tmp_path):
    out = tmp_path / "nopast"
    r = run_cli("export", str(tiny_hf("mistral")), str(out), "--no-past")
    assert r.returncode == 0, r.stderr
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not [i for i in m.graph.input if i.name.startswith("past_key_values")]
    r = run_cli("inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    import json

    sites = json.loads(r.stdout)
    assert len(sites) == 15 and sites[-1]["kind"] == "lm_head"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("export", "no-such-model", "OUT"), "not a known alias"),
        (("inspect", "/no/such/file.onnx"), "does not exist"),
        (("inspect", "NOT_ONNX"), "not a readable ONNX model"),
        (("inspect", "TRUNCATED"), "not a readable ONNX model"),
        (("inspect", "EMPTY_DIR"), "holds no .onnx model"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a protobuf\n" * 10)
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes((tiny_export("llama") / "model.onnx").read_bytes()[:5000])
    (tmp_path / "empty").mkdir()
    subst = {"OUT": str(tmp_path / "o"), "NOT_ONNX": str(not_onnx), "TRUNCATED": str(trunc),
             "EMPTY_DIR": str(tmp_path / "empty")}
    r = run_cli(*[subst.get(a, a) for a in args])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
