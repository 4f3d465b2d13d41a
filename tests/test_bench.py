"""`nm-onnx bench`: interleaved sparse/dense prefill and decode, ORT per-op profile, clear errors.

Never asserts a time: only that the numbers exist, are positive and come from the right models.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from models_cache import tiny_export

from nm_onnx import ops
from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.latency import summarize_profile

needs_lib = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    """A real `transform` output (8:16 with median shift and variance correction, fused)."""
    from nm_onnx.transform import transform

    out = tmp_path_factory.mktemp("sparse") / "sparse"
    transform(tiny_export("llama"), out, "8:16-median-variance")
    return out


@needs_lib
def test_bench_sparse_vs_dense_json(sparse_dir):
    r = run_cli("bench", str(sparse_dir), "--baseline", str(tiny_export("llama")), "--prompt", "32",
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
    # the per-site split reads the transform's site record: every linear kind has time, q..down sparse
    for name in ("model", "baseline"):
        split = {p["sites"]: p for p in res["results"][name]["site_profile"]}
        assert set(split) == {"q", "k", "v", "o", "gate", "up", "down", "lm_head", "outside linear sites"}
        assert all(p["ms"] > 0 for p in split.values())
        assert abs(sum(p["share"] for p in split.values()) - 1.0) < 1e-9


@needs_lib
def test_site_kinds_come_from_the_record(sparse_dir):
    from nm_onnx.evaluation.latency import site_kinds
    from nm_onnx.graph.load import read_proto
    from nm_onnx.passes.record import site_records

    kinds = site_kinds(sparse_dir)
    records = site_records(read_proto(sparse_dir))
    assert len(records) == 14 and all(kinds[n] == r["kind"] for r in records for n in r["nodes"])
    assert kinds["/lm_head/MatMul"] == "lm_head"  # a dense site: its MatMul


@needs_lib
def test_profile_counts_our_kernel(sparse_dir):
    from nm_onnx.evaluation.latency import op_profile

    prof = op_profile(sparse_dir, prompt=16, decode=2, top=50)
    by = {p["op"]: p for p in prof}
    assert by["NMSparseMatMul"]["calls"] == 14 * 3  # 14 sites x (1 prefill + 2 decode steps)


def test_bench_markdown_without_baseline():
    r = run_cli("bench", str(tiny_export("llama")), "--prompt", "8", "--decode", "2", "--repeats", "1", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "| model |" in r.stdout and "ORT per-op profile of model" in r.stdout


def test_decode_needs_kv_cache():
    nopast = tiny_export("llama", with_past=False)
    r = run_cli("bench", str(nopast), "--prompt", "8", "--decode", "4", "--repeats", "1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has no KV cache" in lines[0] and "--decode 0" in lines[0], r.stderr
    r = run_cli("bench", str(nopast), "--prompt", "8", "--decode", "0", "--repeats", "1", "--top", "0", "--json")
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
    from nm_onnx.bench import bench

    with pytest.raises(NmOnnxError, match="--repeats"):
        bench(tiny_export("llama"), repeats=0)


def test_paired_speedup_is_the_median_of_back_to_back_ratios():
    from nm_onnx.evaluation.latency import paired_speedup

    model = {"prefill_s": [1.0, 2.0, 1.0], "decode_s": [1.0, 1.0, 4.0]}
    base = {"prefill_s": [2.0, 2.0, 3.0], "decode_s": [3.0, 1.5, 4.0]}
    # prefill ratios 2, 1, 3 -> 2; decode ratios 3, 1.5, 1 -> 1.5 (the ratio of medians: 2 and 3)
    assert paired_speedup(model, base) == {"prefill_speedup": 2.0, "decode_speedup": 1.5}
    assert paired_speedup({"prefill_s": [1.0]}, {"prefill_s": [2.0]}) == {"prefill_speedup": 2.0}
