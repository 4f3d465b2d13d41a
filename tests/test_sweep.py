"""`nm-onnx sweep`: a two-model x two-recipe x perplexity sweep, caching, resume after a kill, failures in cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import error_lines, run_cli
from models_cache import tiny_export, tiny_hf

from nm_onnx.errors import NmOnnxError
from nm_onnx.sweep import run_sweep
from nm_onnx.sweep.spec import load_spec

PPL = '[evaluations.perplexity]\nwindows = 2\nseqlen = 32\ndata = "text.txt"'
TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park and people walked there. " * 40


def _spec(tmp_path, extra_recipes=(), evaluations=None):
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "bad-6-24", "pattern": "6:24"}))
    recipes = ", ".join(json.dumps(r) for r in ["8:16-magnitude", "2:4-magnitude", *extra_recipes])
    spec = tmp_path / "spec.toml"
    spec.write_text(f'''threads = 1
models = [{{name = "llama", source = "{tiny_export('llama')}"}}, {{name = "qwen2", source = "{tiny_export('qwen2')}"}}]
recipes = [{recipes}]
{evaluations or PPL}
''')
    return spec


def _rows(rep):
    return [(r["model"], r["recipe"], r["metrics"], r["errors"]) for r in rep["rows"]]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    spec = _spec(d, ["bad.json"])
    return spec, d / "out", run_sweep(spec, d / "out")


def test_local_sweep_table(local):
    _, out, rep = local
    assert [(m, r) for m, r, _, _ in _rows(rep)] == [(m, r) for m in ("llama", "qwen2")
                                                     for r in ("dense", "8:16-magnitude", "2:4-magnitude", "bad")]
    for row in rep["rows"]:
        if row["recipe"] == "bad":
            continue
        assert row["metrics"]["perplexity.ppl"] > 1 and not row["errors"]
        dense = next(x for x in rep["rows"] if x["model"] == row["model"] and x["recipe"] == "dense")
        if row["recipe"] != "dense":
            assert row["deltas"]["perplexity.ppl"] == pytest.approx(
                row["metrics"]["perplexity.ppl"] - dense["metrics"]["perplexity.ppl"])
    md = (out / "report.md").read_text()
    assert "| llama | 8:16-magnitude |" in md and json.loads((out / "report.json").read_text())["rows"]


def test_failing_job_is_reported_in_its_cell(local):
    _, out, rep = local
    bad = [r for r in rep["rows"] if r["recipe"] == "bad"]
    assert len(bad) == 2 and all(not r["metrics"] for r in bad)
    for r in bad:
        assert r["errors"]["perplexity"].startswith("transform failed: recipe 'bad-6-24': pattern 6:24 does not divide")
        assert "\n" not in r["errors"]["perplexity"]
    assert "error: transform failed: recipe 'bad-6-24'" in (out / "report.md").read_text()


def test_cli_exit_1_when_a_job_failed(local):
    spec, out, _ = local
    r = run_cli("sweep", spec, "--out", out, env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 1 and "4 job(s) failed or were skipped" in r.stderr  # 2 transforms, 2 evaluations, r.stderr[-2000:]
    assert "error: transform failed" in (out / "report.md").read_text()  # the report is still written


def test_rerun_computes_nothing(local):
    spec, out, rep = local
    again = run_sweep(spec, out)
    assert _rows(again) == _rows(rep)
    assert "computed" not in again["jobs"]


def test_killed_sweep_resumes_only_missing_cells(tmp_path, local):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nm_onnx", "sweep", str(spec), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    evals = out / "cache" / "evaluate"
    deadline = time.time() + 600
    while time.time() < deadline and not (evals.is_dir() and any(evals.glob("*.json"))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    present = {p.name for kind in ("transform", "evaluate") for p in (out / "cache" / kind).glob("*")
               if not p.name.startswith(".")} if (out / "cache").is_dir() else set()
    rep = run_sweep(spec, out)
    from nm_onnx.sweep.jobs import entry, plan

    jobs = plan(load_spec(spec))
    for j in jobs:
        if j.kind == "export":
            continue  # an ONNX export source: used where it is
        was = entry(out, j).name in present
        assert rep["job_status"][j.id] == ("cached" if was else "computed"), j.id
    assert 0 < sum(s == "computed" for s in rep["job_status"].values()) < len(jobs)
    assert not list(out.rglob(".nm-onnx-partial-*"))  # the killed run's stages are cleaned up
    full = {(m, r): v for m, r, v, _ in _rows(local[2])}
    assert all(full[(m, r)] == v for m, r, v, _ in _rows(rep))  # same numbers as an uninterrupted sweep


@pytest.mark.parametrize("body, key", [
    ('models = ["nope-model"]\nrecipes = ["8:16-magnitude"]\n[evaluations.perplexity]\n', "models[0].source"),
    ('models = ["M"]\nrecipes = ["8:16-magnitude"]\n[evaluations.perplexity]\nwindow = 2\n',
     "evaluations.perplexity.window: unknown key"),
    ('models = ["M"]\nrecipes = ["8:17-nope"]\n[evaluations.perplexity]\n', "recipes[0].source"),
    ('models = ["M"]\nrecipes = ["8:16-magnitude"]\n[evaluations.lm_eval]\ntasks = ["hellaswag"]\n',
     "evaluations.lm_eval.tasks"),
    ('models = ["M"]\nrecipes = ["8:16-magnitude"]\n[evaluations.perplexity]\nseqlen = "x"\n',
     "evaluations.perplexity.seqlen"),
    ('modles = ["M"]\n', "modles: unknown key"),
    ('models = ["H"]\nrecipes = ["autotune:-5%"]\n[evaluations.perplexity]\n', "recipes[0].source: --budget '-5%'"),
    ('models = ["H"]\nrecipes = ["weight:2:x"]\n[evaluations.perplexity]\n', "recipes[0].source"),
    ('models = ["H"]\nrecipes = ["autotune:5%"]\n[autotune]\ncandidates = "dense,9:16x"\n[evaluations.perplexity]\n',
     "autotune.candidates"),
    (('models = ["H"]\nrecipes = ["autotune:5%"]\n[autotune]\nbase_recipe = "8:16-learned-shift"\n'
      '[evaluations.perplexity]\n'), "autotune.base_recipe"),
    ('models = ["M"]\nrecipes = ["weight:8:16"]\n[evaluations.perplexity]\n', "models[0].source: "),
    ('models = ["M"]\nrecipes = ["8:16-magnitude"]\n[evaluations.twin]\n', "is an ONNX export, but twin"),
    ('models = [{source = "H", export = "H"}]\nrecipes = ["8:16-magnitude"]\n[evaluations.perplexity]\n',
     "models[0].export: "),
])
def test_bad_spec_is_one_line_exit_2(tmp_path, body, key):
    spec = tmp_path / "s.toml"
    spec.write_text(body.replace('"M"', json.dumps(str(tiny_export("llama")))).replace('"H"', json.dumps(str(tiny_hf("llama")))))
    r = run_cli("sweep", spec, "--out", tmp_path / "out", env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and key in lines[0], lines
    assert not (tmp_path / "out").exists()  # checked before anything was written


def test_output_folder_rules(tmp_path):
    spec = _spec(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(NmOnnxError, match="holds files nm-onnx did not write"):
        run_sweep(spec, mine)
    with pytest.raises(NmOnnxError, match="contains the input"):
        run_sweep(spec, tmp_path)
    assert (mine / "notes.txt").read_text() == "keep"


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(NmOnnxError, match=r"pip install 'nm-onnx\[cluster\]'"):
        run_sweep(_spec(tmp_path), tmp_path / "out", backend="ray")
    assert not (tmp_path / "out").exists()


def test_ray_backend_gives_the_same_table(tmp_path, local):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nm-onnx[cluster]')")
    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                                   "HF_HUB_OFFLINE": "1"}})
    try:
        spec = _spec(tmp_path, ["bad.json"])
        rep = run_sweep(spec, tmp_path / "out", backend="ray")
    finally:
        ray.shutdown()
    assert _rows(rep) == _rows(local[2])


def test_twin_weight_and_export_rows(tmp_path):
    """A Hugging Face source with its export given: the twin (PyTorch reference) equals ORT on the same
    windows, a weight-pruning row has its PyTorch perplexity and no ORT evaluations."""
    (tmp_path / "text.txt").write_text(TEXT)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'''threads = 1
models = [{{name = "llama", source = "{tiny_hf('llama')}", export = "{tiny_export('llama')}"}}]
recipes = ["8:16-magnitude", {{name = "w", source = "weight:8:16"}}]
{PPL}
[evaluations.twin]
windows = 1
seqlen = 32
data = "text.txt"
''')
    rep = run_sweep(spec, tmp_path / "out")
    rows = {r["recipe"]: r for r in rep["rows"]}
    assert list(rows) == ["dense", "8:16-magnitude", "w"] and rows["w"]["kind"] == "weight"
    for name in ("dense", "8:16-magnitude"):
        m = rows[name]["metrics"]
        assert m["twin.ppl_torch"] == pytest.approx(m["twin.ppl_ort"], rel=1e-3), m
    assert set(rows["w"]["metrics"]) == {"perplexity.ppl_torch"} and not rows["w"]["errors"]
    assert rows["w"]["metrics"]["perplexity.ppl_torch"] != rows["dense"]["metrics"]["perplexity.ppl"]
    assert not (tmp_path / "out" / "cache" / "export").exists()  # the given export is the dense model
    assert "ppl_torch of a weight-pruning row" in (tmp_path / "out" / "report.md").read_text()
