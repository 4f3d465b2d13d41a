"""`transform --prefill-dispatch ROWS`: one If picks the prefill form (ORT's MatMul on the masked
activation) above ROWS token rows and the fused decode form below (nm_onnx.passes.dispatch).

Real exports of the tiny random Llama (optimum) and of ORT GenAI's builder, real ORT sessions and
og.Generator: the dispatched model equals the plain transform output bit for bit on the rows that take
the decode form and to float rounding above, its two forms are plain models that validate checks, and
the errors a user can make are refused before any work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import error_lines, needs_library, run_cli
from models_cache import tiny_export, tiny_hf

from nm_onnx.errors import NmOnnxError

pytestmark = [needs_library, pytest.mark.usefixtures("torch_one_thread")]

RECIPE = "8:16-median-variance"  # TokenShift + shift bias + variance correction: the whole prefill form


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(plain, dispatched) transform outputs of the tiny Llama export, same recipe."""
    from nm_onnx.transform import transform

    root = tmp_path_factory.mktemp("dispatch")
    plain, disp = root / "plain", root / "disp"
    transform(tiny_export("llama"), plain, RECIPE)
    report = transform(tiny_export("llama"), disp, RECIPE, prefill_dispatch=2)
    return plain, disp, report


def _logits(path, ids):
    from nm_onnx.evaluation.feeds import make_feed
    from nm_onnx.runtime import make_session

    sess = make_session(path)
    return sess.run(["logits"], make_feed(sess, ids))[0]


def test_one_if_two_forms_and_the_report(pair):
    from nm_onnx.graph.load import load_model
    from nm_onnx.passes.dispatch import dispatch_info
    from nm_onnx.passes.record import site_records

    _, disp, report = pair
    assert report.passes.dispatch == {"rows": 2, "sites": 14}
    assert "prefill dispatch: 14 site(s)" in report.table()
    assert json.loads((disp / "nm_onnx_transform.json").read_text())["dispatch"] == {"rows": 2, "sites": 14}
    model = load_model(disp / "model.onnx")
    assert dispatch_info(model) == {"rows": 2, "sites": 14}
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert len(ifs) == 1 and [o.name for o in ifs[0].outputs] == [o.name for o in model.graph.outputs
                                                                    if o.producer() is ifs[0]]
    then, other = (ifs[0].attributes[k].as_graph() for k in ("then_branch", "else_branch"))
    count = {g: {op: sum(1 for n in b if n.op_type == op) for op in ("NMSparseMatMul", "NMMask", "TokenShift")}
             for g, b in (("prefill", then), ("decode", other))}
    assert count == {"prefill": {"NMSparseMatMul": 0, "NMMask": 14, "TokenShift": 14},
                     "decode": {"NMSparseMatMul": 14, "NMMask": 0, "TokenShift": 0}}
    assert not any(n.domain == "nm_onnx" for n in model.graph)  # every site is inside the If
    records = site_records(model)
    assert len(records) == 14 and all(r["fused"] and r["dispatch"]["prefill"] for r in records)


def test_dispatched_equals_plain(pair):
    """<= ROWS rows: the same kernel, bit for bit; more rows: ORT's MatMul, equal to float rounding."""
    plain, disp, _ = pair
    rng = np.random.default_rng(0)
    for t in (1, 2, 3, 17):
        ids = rng.integers(0, 500, size=(1, t))
        a, b = _logits(plain, ids), _logits(disp, ids)
        if t <= 2:
            assert np.array_equal(a, b), t
        else:
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), t
            assert (a.argmax(-1) == b.argmax(-1)).all()


def test_select_form_gives_plain_models(pair):
    """The decode form is the plain transform output; the prefill form is an unfused-style model whose
    records name its NMMask chains (what validate cuts out per site)."""
    from nm_onnx.graph.load import load_model
    from nm_onnx.passes.dispatch import dispatch_info, select_form
    from nm_onnx.passes.record import site_records

    plain, disp, _ = pair
    ref = load_model(plain / "model.onnx")
    decode = load_model(disp / "model.onnx")
    select_form(decode, "decode")
    assert dispatch_info(decode) is None and not any(n.op_type == "If" for n in decode.graph)
    assert sorted(n.name for n in decode.graph) == sorted(n.name for n in ref.graph)  # the order may differ:
    # nodes that read no site output (masks, rotary tables) stayed outside the If, ahead of it
    assert set(decode.graph.initializers) == set(ref.graph.initializers)
    assert [r["nodes"] for r in site_records(decode)] == [r["nodes"] for r in site_records(ref)]
    prefill = load_model(disp / "model.onnx")
    select_form(prefill, "prefill")
    records = site_records(prefill)
    assert all(r["op"] == "NMMask" and not r["fused"] and "dispatch" not in r for r in records)
    assert sum(1 for n in prefill.graph if n.op_type == "NMSparseMatMul") == 0
    with pytest.raises(ValueError, match="form must be one of"):
        select_form(prefill, "both")


def test_validate_checks_both_forms(pair):
    from nm_onnx.validate import validate

    _, disp, _ = pair
    result = validate(tiny_export("llama"), disp, tiny_hf("llama"), RECIPE, checks="bce", seqlen=48, limit=2)
    names = [(r.check, r.name.rsplit("[", 1)[-1] if "[" in r.name else "") for r in result.results]
    assert names == [("b", "prefill form]"), ("b", "decode form]"), ("c", "prefill form]"), ("c", "decode form]"),
                     ("e", "")]
    assert all(r.status == "PASS" for r in result.results[:4]), [r.line() for r in result.results]
    assert result.results[-1].status != "FAIL"


def test_bench_profiles_the_sites_of_both_forms(pair):
    """The per-site split attributes the prefill form's nodes too and never counts the If (its time is
    its branch's nodes' time)."""
    from nm_onnx.evaluation.latency import profile_events, site_kinds, summarize_profile, summarize_sites

    _, disp, _ = pair
    kinds = site_kinds(disp / "model.onnx")
    assert kinds["/lm_head/MatMul"] == "lm_head"  # inside both branches
    assert sum(1 for k in kinds if "/prefill/" in k) > 14
    events = profile_events(disp, prompt=8, decode=2)
    assert "If" not in {p["op"] for p in summarize_profile(events, top=100)}
    split = {p["sites"]: p["ms"] for p in summarize_sites(events, kinds)}
    assert all(split[k] > 0 for k in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"))


def test_refusals_before_any_work(tmp_path):
    from nm_onnx.transform import transform

    out = tmp_path / "o"
    with pytest.raises(NmOnnxError, match="drop --no-fuse"):
        transform(tiny_export("llama"), out, RECIPE, fuse=False, prefill_dispatch=2)
    with pytest.raises(NmOnnxError, match="token rows >= 1"):
        transform(tiny_export("llama"), out, RECIPE, prefill_dispatch=0)
    assert not out.exists()
    r = run_cli("transform", str(tiny_export("llama")), str(out), "--recipe", RECIPE, "--prefill-dispatch", "0")
    assert r.returncode == 2 and not out.exists()
    assert error_lines(r.stderr)[-1].endswith("argument --prefill-dispatch: must be at least 1, got 0")
    r = run_cli("transform", str(tiny_export("llama")), str(out), "--recipe", RECIPE, "--prefill-dispatch", "2",
                "--no-fuse")
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "drop --no-fuse" in r.stderr
    # quantized sites are not dispatched: the report says why, the model has no If
    report = transform(tiny_export("llama"), out, RECIPE, quantize="int4", prefill_dispatch=2)
    assert report.passes.dispatch["sites"] == 0 and "no fused float site" in report.passes.dispatch["reason"]


def test_inspect_says_dispatch_and_finds_the_dense_lm_head(pair):
    _, disp, _ = pair
    r = run_cli("inspect", str(disp))
    assert r.returncode == 0, r.stderr
    assert "prefill dispatch: above 2 token row(s) 14 site(s)" in r.stdout
    assert "1 dense linear sites: lm_head=1" in r.stdout
    data = json.loads(run_cli("inspect", str(disp), "--json").stdout)
    assert data["dispatch"] == {"rows": 2, "sites": 14} and [s["kind"] for s in data["dense_sites"]] == ["lm_head"]
