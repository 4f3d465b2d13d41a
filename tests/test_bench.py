"""`nm-onnx bench`: interleaved sparse/dense prefill and decode, ORT per-op profile, clear errors.

Never asserts a time: only that the numbers exist, are positive and come from the right models.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models_cache import tiny_export

from nm_onnx import ops
from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.latency import summarize_profile

needs_lib = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nm_onnx", *args], check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    import shutil

    from sparse_fixture import hand_transform

    dense = tiny_export("llama")
    out = tmp_path_factory.mktemp("sparse")
    hand_transform(dense, out / "model.onnx")
    for f in dense.iterdir():
        if f.is_file() and f.suffix != ".onnx":
            shutil.copy(f, out / f.name)
    return out


@needs_lib
def test_bench_sparse_vs_dense_json(sparse_dir):
    r = _cli("bench", str(sparse_dir), "--baseline", str(tiny_export("llama")), "--prompt", "32",
             "--decode", "4", "--repeats", "2", "--top", "5", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for name in ("model", "baseline"):
        m = res["results"][name]
        assert len(m["prefill_s"]) == 2 and len(m["decode_s"]) == 2
        assert m["prefill_tok_s"] > 0 and m["decode_tok_s"] > 0
        assert 0 < len(m["profile"]) <= 5
        assert abs(sum(p["share"] for p in m["profile"])) <= 1.0 + 1e-9
    ops_sparse = {p["op"] for p in res["results"]["model"]["profile"]}
    ops_dense = {p["op"] for p in res["results"]["baseline"]["profile"]}
    assert "NMSparseMatMul" not in ops_dense
    assert res["prefill_speedup"] > 0 and res["decode_speedup"] > 0
    assert "[bench] repeat 2/2 baseline" in r.stderr  # interleaved, progress on stderr
    assert ops_sparse  # sparse profile exists


@needs_lib
def test_profile_counts_our_kernel(sparse_dir):
    from nm_onnx.evaluation.latency import op_profile

    prof = op_profile(sparse_dir, prompt=16, decode=2, top=50)
    by = {p["op"]: p for p in prof}
    assert by["NMSparseMatMul"]["calls"] == 14 * 3  # 14 sites x (1 prefill + 2 decode steps)


def test_bench_markdown_without_baseline():
    r = _cli("bench", str(tiny_export("llama")), "--prompt", "8", "--decode", "2", "--repeats", "1", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "| model |" in r.stdout and "ORT per-op profile of model" in r.stdout


def test_decode_needs_kv_cache():
    nopast = tiny_export("llama", with_past=False)
    r = _cli("bench", str(nopast), "--prompt", "8", "--decode", "4", "--repeats", "1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has no KV cache" in lines[0] and "--decode 0" in lines[0], r.stderr
    r = _cli("bench", str(nopast), "--prompt", "8", "--decode", "0", "--repeats", "1", "--top", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "decode_tok_s" not in json.loads(r.stdout)["results"]["model"]


def test_summarize_profile_aggregates_kernel_events():
    ev = [
        {"cat": "Node", "name": "a_kernel_time", "dur": 3000, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "b_kernel_time", "dur": 1000, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "c_kernel_time", "dur": 4000, "args": {"op_name": "NMSparseMatMul"}},
        {"cat": "Node", "name": "c_fence_before", "dur": 9999, "args": {"op_name": "NMSparseMatMul"}},
        {"cat": "Session", "name": "model_run", "dur": 99999},
    ]
    prof = summarize_profile(ev)
    assert [(p["op"], p["ms"], p["calls"]) for p in prof] == [("MatMul", 4.0, 2), ("NMSparseMatMul", 4.0, 1)] or \
        [(p["op"], p["ms"], p["calls"]) for p in prof] == [("NMSparseMatMul", 4.0, 1), ("MatMul", 4.0, 2)]
    assert abs(sum(p["share"] for p in prof) - 1.0) < 1e-12


def test_bad_repeats():
    from nm_onnx.commands.bench import bench

    with pytest.raises(NmOnnxError, match="--repeats"):
        bench(tiny_export("llama"), repeats=0)


def test_paired_speedup_is_the_median_of_back_to_back_ratios():
    from nm_onnx.evaluation.latency import paired_speedup

    model = {"prefill_s": [1.0, 2.0, 1.0], "decode_s": [1.0, 1.0, 4.0]}
    base = {"prefill_s": [2.0, 2.0, 3.0], "decode_s": [3.0, 1.5, 4.0]}
    # prefill ratios 2, 1, 3 -> 2; decode ratios 3, 1.5, 1 -> 1.5 (the ratio of medians: 2 and 3)
    assert paired_speedup(model, base) == {"prefill_speedup": 2.0, "decode_speedup": 1.5}
    assert paired_speedup({"prefill_s": [1.0]}, {"prefill_s": [2.0]}) == {"prefill_speedup": 2.0}
