"""`transform --quantize int4|int8`: float sites quantized (RTN, the MatMulNBits scheme), sparse sites run
NMSparseMatMulNBits over exactly those values, and validate compares with a PyTorch reference that
computes with the same dequantized weights (so its layer-wise, teacher-forced and perplexity checks
stay exact)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import error_lines, needs_library, run_cli
from models_cache import tiny_export, tiny_hf

from nm_onnx.ops import nbits

RECIPE = "8:16-median-variance"


def _ops(path):
    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return [n for n in m.graph.node], {p.key: p.value for p in m.metadata_props}


@pytest.mark.parametrize("quantize,block,symmetric", [("int4", 32, True), ("int8", 16, False)])
def test_quantized_sites_use_the_rtn_weights_of_the_float_export(tmp_path, quantize, block, symmetric):
    from nm_onnx.graph import find_linear_sites, load_model
    from nm_onnx.graph.constants import load_weight
    from nm_onnx.transform import transform
    from nm_onnx.validate import quantized_weights

    dense = tiny_export("llama")
    out = tmp_path / "q"
    report = transform(dense, out, RECIPE, quantize=quantize, quant_block_size=block, quant_symmetric=symmetric)
    nodes, meta = _ops(out)
    kinds = {(n.op_type, n.domain) for n in nodes}
    assert ("MatMul", "") not in {(n.op_type, n.domain) for n in nodes if "proj" in n.name or "lm_head" in n.name}
    assert ("NMSparseMatMulNBits", "nm_onnx") in kinds and ("MatMulNBits", "com.microsoft") in kinds
    lm_head = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert [n.name for n in lm_head] == ["/lm_head/MatMul_Q" + quantize[-1]]  # the dense site stays quantized
    bits = int(quantize[3:])
    assert meta["nm_onnx.quantize"] == f"int{bits} block {block} {'symmetric' if symmetric else 'asymmetric'} RTN"
    assert all(r["quant"] == {"bits": bits, "block_size": block, "symmetric": symmetric}
               for r in report.passes.records)
    # every linear computes with nbits.quantize of the float weight, bit for bit (dense lm_head included)
    model = load_model(dense)
    floats = {s.module: np.asarray(load_weight(model, s), np.float32) for s in find_linear_sites(model)}
    got = quantized_weights(out)
    assert set(got) == set(floats) and len(got) == 15
    for module, w in floats.items():
        want = nbits.quantize(w.T, bits, block, symmetric).dequantize().T
        assert np.array_equal(got[module].view(np.uint32), want.view(np.uint32)), module


@needs_library
def test_validate_is_exact_on_quantized_sites(tmp_path, capsys):
    """(b) masks identical and outputs within 1e-5, (c) ORT's masks replayed through the reference with
    the dequantized weights: logits within 1e-3 (the float reference differs by the quantization)."""
    from nm_onnx.transform import transform
    from nm_onnx.validate import main

    sparse = tmp_path / "q"
    transform(tiny_export("llama"), sparse, RECIPE, quantize="int4", quant_block_size=16, quant_symmetric=False)
    capsys.readouterr()
    report = tmp_path / "report.json"
    rc = main([str(tiny_export("llama")), str(sparse), "--model", str(tiny_hf("llama")), "--recipe", RECIPE,
               "--checks", "bc", "--seqlen", "64", "--json", str(report)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err[-3000:]
    checks = {c["check"]: c for c in json.loads(report.read_text())["checks"]}
    b, c = checks["b"]["details"], checks["c"]["details"]
    assert b["sites"] == 14 and b["sites_with_mask_mismatch"] == 0 and checks["b"]["value"] <= 1e-5
    assert c["max_abs_diff"] < 1e-3 and c["top1_agreement"] == 1.0
    assert "dequantized weights (15 linears)" in out.err


def test_quantize_errors_before_any_work(tmp_path):
    dense = tiny_export("llama")
    cases = [
        (["--quantize", "int3"], "invalid choice"),
        (["--quantize", "int4", "--quant-block-size", "24"], "--quant-block-size 24 must be a power of two >= 16"),
    ]
    for args, message in cases:
        r = run_cli("transform", dense, tmp_path / "x", "--recipe", RECIPE, *args)
        assert r.returncode == 2, r.stderr
        assert message in (error_lines(r.stderr) or [r.stderr])[-1]
    assert not (tmp_path / "x").exists()
