"""Reliability: nm-onnx never loses a user's data and never answers with a traceback.

One test per case of docs/errors.md (issue 12 sections 1-4): outputs that would replace an input or
a folder nm-onnx did not write are refused (exit 2, one line) and leave everything as it was;
SIGINT / SIGTERM / SIGKILL leave no partial output behind; OS faults (read-only filesystem, full
disk, permission denied, a file in the parent path, a missing external-data file) and bad input
files are named in one line; numeric options fail in argparse before torch is imported.
Real files, real ORT sessions, real subprocesses; read-only and full filesystems are real tmpfs
mounts (those tests need root and skip otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import error_lines, run_cli
from models_cache import tiny_export, tiny_hf
from onnx import TensorProto, helper, numpy_helper

from nm_onnx import ops

needs_library = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def one_error(r, needle: str, code: int = 2) -> str:
    lines = error_lines(r.stderr)
    assert r.returncode == code, r.stderr[-3000:]
    assert len(lines) == 1 and needle in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def partials(root: Path) -> list[Path]:
    """Hidden entries: staging directories and files, whatever their naming."""
    return [p for p in root.rglob(".*")]


@pytest.fixture
def user_dir(tmp_path):
    """A folder of the user's that nm-onnx did not write."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    return d


# ------------------------------------------------------------------------------ 1. data safety
def test_export_into_its_own_source_is_refused(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf("llama"), src)
    before = snapshot(src)
    one_error(run_cli("export", src, src), "is the input")
    one_error(run_cli("export", src, src / "onnx"), "lies inside the input")
    assert snapshot(src) == before


def test_transform_over_a_folder_holding_the_input_is_refused(tmp_path):
    x = tmp_path / "X"
    shutil.copytree(tiny_export("llama"), x / "dense")
    before = snapshot(x)
    one_error(run_cli("transform", x / "dense", x, "--recipe", "8:16-magnitude"), "contains the input")
    one_error(run_cli("transform", x / "dense", x / "dense", "--recipe", "8:16-magnitude"), "is the input")
    assert snapshot(x) == before


@needs_library
def test_foreign_output_folders_are_refused_and_kept(tmp_path, user_dir):
    before = snapshot(user_dir)
    one_error(run_cli("transform", tiny_export("llama"), user_dir, "--recipe", "8:16-magnitude"),
              "holds files nm-onnx did not write (notes.txt)")
    one_error(run_cli("export", tiny_hf("llama"), user_dir), "holds files nm-onnx did not write")
    one_error(run_cli("calibrate", tiny_hf("llama"), "--recipe", "8:16-static-shift", "--out", user_dir),
              "--out directory")
    one_error(run_cli("evaluate", tiny_export("llama"), "--limit", "1", "--out", user_dir), "--out directory")
    one_error(run_cli("demo", "--model", tiny_hf("llama"), "--out", user_dir), "is not a folder an earlier")
    assert snapshot(user_dir) == before
    # --overwrite replaces it, as asked
    r = run_cli("transform", tiny_export("llama"), user_dir, "--recipe", "8:16-magnitude", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (user_dir / "notes.txt").exists() and (user_dir / "model.onnx").is_file()


@needs_library
def test_earlier_output_of_the_same_kind_is_replaced_and_said(tmp_path):
    out = tmp_path / "sparse"
    assert run_cli("transform", tiny_export("llama"), out, "--recipe", "8:16-magnitude").returncode == 0
    r = run_cli("transform", tiny_export("llama"), out, "--recipe", "2:4-magnitude")
    assert r.returncode == 0, r.stderr
    assert f"replacing the earlier transform output '{out}'" in r.stderr
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(meta["nm_onnx.recipe"])["pattern"] == "2:4"
    # an nm-onnx output a user added a file to, or one of another kind, is not replaced
    (out / "mine.txt").write_text("added by the user")
    one_error(run_cli("transform", tiny_export("llama"), out, "--recipe", "8:16-magnitude"), "mine.txt")
    assert (out / "mine.txt").read_text() == "added by the user"
    exp = tmp_path / "exp"
    assert run_cli("export", tiny_hf("llama"), exp).returncode == 0
    one_error(run_cli("transform", tiny_export("llama"), exp, "--recipe", "8:16-magnitude"),
              "holds an nm-onnx export output, not a transform output")


@needs_library
def test_file_outputs_are_not_overwritten(tmp_path, user_dir):
    src = tiny_export("llama") / "model.onnx"
    mine = user_dir / "notes.txt"
    one_error(run_cli("transform", src, mine, "--recipe", "8:16-magnitude"), "was not written by nm-onnx")
    assert mine.read_text() == "precious"
    one_error(run_cli("validate", tiny_export("llama"), tiny_export("llama"), "--model", tiny_hf("llama"),
                      "--recipe", "8:16-magnitude", "--checks", "d", "--json", mine), "was not written by nm-onnx")
    assert mine.read_text() == "precious"
    out = tmp_path / "s.onnx"
    assert run_cli("transform", src, out, "--recipe", "8:16-magnitude").returncode == 0
    assert run_cli("transform", src, out, "--recipe", "2:4-magnitude").returncode == 0  # ours: replaced


# ------------------------------------------------------------------------------ 2. interrupts
def _big_model(path: Path, layers: int = 48, k: int = 1024) -> Path:
    """A chain of `layers` MatMuls named like decoder MLP sites, weights in external data (~200 MB)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", k])
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((k, k)) * 0.03).astype(np.float32), f"w{i}")
        inits.append(w)
        out = "logits" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [h, w.name], [out], name=f"/model/layers.{i}/mlp/down_proj/MatMul"))
        h = out
    model = helper.make_model(helper.make_graph(nodes, "big", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path.mkdir(parents=True)
    onnx.save(model, str(path / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    return path


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    return _big_model(tmp_path_factory.mktemp("big") / "dense")


def _start_transform(src, out):
    """transform of the big model with a recipe that selects its sites (a preset's attention glob would
    match nothing there: the run would end in that error, racing the interrupt the tests send)."""
    recipe = src.parent / "down_proj_8x16.json"
    if not recipe.exists():
        recipe.write_text(json.dumps({"name": "down-8x16", "pattern": "8:16", "shift": "median",
                                      "targets": ["model.layers.*.mlp.down_proj"]}))
    return subprocess.Popen([sys.executable, "-m", "nm_onnx", "transform", str(src), str(out), "--recipe",
                             str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(parent: Path, proc, timeout=120) -> None:
    """Until the staging directory exists (not the short-lived probe file of the writability check)."""
    t0 = time.time()
    while not [p for p in partials(parent) if p.is_dir()]:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no staging directory appeared"
        time.sleep(0.01)


@needs_library
@pytest.mark.parametrize("signals, code", [((signal.SIGTERM,), 143), ((signal.SIGINT, signal.SIGINT), 130)])
def test_interrupt_removes_the_staging_directory(big_model, tmp_path, signals, code):
    out_parent = tmp_path / "o"
    out_parent.mkdir()
    proc = _start_transform(big_model, out_parent / "sparse")
    _wait_for_partial(out_parent, proc)
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = error_lines(err)
    assert len(lines) == 1 and "interrupted by" in lines[0] and "Traceback" not in err, err
    assert list(out_parent.iterdir()) == []  # no staging directory, no partial output


@needs_library
def test_next_run_removes_what_a_killed_run_left(big_model, tmp_path):
    out_parent = tmp_path / "o"
    out_parent.mkdir()
    proc = _start_transform(big_model, out_parent / "sparse")
    _wait_for_partial(out_parent, proc)
    proc.kill()
    proc.communicate()
    left = partials(out_parent)
    assert left  # SIGKILL cannot clean up
    r = run_cli("transform", tiny_export("llama"), out_parent / "other", "--recipe", "8:16-magnitude")
    assert r.returncode == 0, r.stderr
    assert all(f"removed '{p}'" in r.stderr for p in left), r.stderr
    assert partials(out_parent) == [] and sorted(p.name for p in out_parent.iterdir()) == ["other"]


# ------------------------------------------------------------------------------ 3. OS faults, bad input
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (root only): yields a function mount(options) -> path; unmounted afterwards."""
    if not IS_ROOT or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(options: str) -> Path:
        p = tmp_path / f"fs{len(mounted)}"
        p.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(p)], capture_output=True, text=True, check=False)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(p)
        return p

    yield mount
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)


@needs_library
def test_read_only_filesystem_is_named_before_the_work(tmpfs):
    ro = tmpfs("ro,size=1m")
    one_error(run_cli("transform", tiny_export("llama"), ro / "sparse", "--recipe", "8:16-magnitude"),
              "the filesystem is read-only")
    r = run_cli("evaluate", tiny_export("llama"), "--limit", "1", "--out", ro / "res")
    one_error(r, "read-only")
    assert "perplexity" not in r.stderr.lower()  # checked before evaluating


@needs_library
def test_full_disk_is_named_and_leaves_nothing(tmpfs):
    full = tmpfs("size=64k")
    one_error(run_cli("transform", tiny_export("llama"), full / "sparse", "--recipe", "8:16-magnitude"),
              "no space left on the device")
    assert list(full.iterdir()) == []


@needs_library
def test_permission_denied_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if IS_ROOT:  # root ignores permissions: run the command as nobody
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root")
        os.chmod(tmp_path, 0o755)
        os.chmod(locked, 0o755)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        os.chmod(locked, 0o555)
        prefix = []
    env = {**os.environ, "NM_ONNX_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    src = tmp_path / "dense"
    shutil.copytree(tiny_export("llama"), src)
    for p in [src, *src.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    r = subprocess.run([*prefix, sys.executable, "-m", "nm_onnx", "transform", str(src), str(locked / "out"),
                        "--recipe", "8:16-magnitude"], capture_output=True, text=True, env=env, timeout=600,
                       check=False)
    one_error(r, "permission denied")


@needs_library
def test_a_file_in_the_parent_path_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    one_error(run_cli("transform", tiny_export("llama"), tmp_path / "afile" / "out", "--recipe", "8:16-magnitude"),
              "is not a directory")


def test_missing_external_data_is_named(big_model, tmp_path):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(big_model / "model.onnx", lonely / "model.onnx")
    for cmd in (("inspect", lonely), ("transform", lonely, tmp_path / "o", "--recipe", "8:16-magnitude"),
                ("evaluate", lonely, "--tokenizer", tiny_export("llama")), ("bench", lonely)):
        one_error(run_cli(*cmd), "which is missing from")


@needs_library
@pytest.mark.parametrize("content", [b"", b"this is not a model at all" * 10, "truncated"])
def test_corrupt_model_files_are_named(tmp_path, content):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export("llama"), bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 3] if content == "truncated" else content)
    needle = "is empty" if content == b"" else "ONNX"
    for cmd in (("evaluate", bad, "--limit", "1"), ("bench", bad, "--decode", "1", "--repeats", "1"),
                ("validate", bad, bad, "--model", tiny_hf("llama"), "--recipe", "8:16-magnitude"),
                ("inspect", bad), ("transform", bad, tmp_path / "o", "--recipe", "8:16-magnitude")):
        one_error(run_cli(*cmd), needle)


@needs_library
def test_a_bad_op_library_is_named_and_dense_models_still_run(tmp_path):
    fake = tmp_path / "libnm_onnx_ops.so"
    fake.write_text("not a shared library")
    sparse = tmp_path / "sparse"
    assert run_cli("transform", tiny_export("llama"), sparse, "--recipe", "8:16-magnitude").returncode == 0
    env = {"NM_ONNX_OPS_LIB": str(fake)}
    one_error(run_cli("evaluate", sparse, "--limit", "1", "--seqlen", "64", env=env), "cannot load the nm_onnx op library")
    r = run_cli("evaluate", tiny_export("llama"), "--limit", "1", "--seqlen", "64", env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cmd, needle", [
    (("evaluate", "{exp}", "--seqlen", "100000"), "--seqlen 100000 exceeds the model's context of 256"),
    (("bench", "{exp}", "--prompt", "100000"), "exceeds the model's context of 256"),
    (("evaluate-torch", "{hf}", "--recipe", "dense", "--seqlen", "4096"), "exceeds the model's context"),
    (("calibrate", "{hf}", "--recipe", "8:16-static-shift", "--seqlen", "4096", "--out", "{tmp}/c"),
     "exceeds the model's context"),
])
def test_windows_beyond_the_context_are_refused(cmd, needle, tmp_path):
    fill = {"exp": tiny_export("llama"), "hf": tiny_hf("llama"), "tmp": tmp_path}
    one_error(run_cli(*[str(c).format(**fill) for c in cmd]), needle)


_NO_TORCH = """
import sys
from nm_onnx.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("torch imported" if "torch" in sys.modules else "no torch", rc)
"""


@pytest.mark.parametrize("args, needle", [
    (("bench", "M", "--warmup", "-1"), "argument --warmup: must be at least 0, got -1"),
    (("bench", "M", "--top", "-3"), "argument --top: must be at least 0"),
    (("bench", "M", "--threads", "-2"), "argument --threads: must be at least 1"),
    (("bench", "M", "--repeats", "0"), "argument --repeats: must be at least 1"),
    (("evaluate", "M", "--limit", "0"), "argument --limit: must be at least 1, got 0"),
    (("evaluate", "M", "--seqlen", "x"), "argument --seqlen: expected an integer"),
    (("calibrate", "nope-model", "--recipe", "8:16-magnitude", "--out", "o"), "not a known alias"),
    (("evaluate-torch", "nope-model", "--recipe", "dense"), "not a known alias"),
    (("validate", "D", "S", "--model", "m", "--recipe", "8:16-magnitude", "--limit", "0"), "--limit"),
])
def test_bad_options_fail_before_torch_is_imported(args, needle):
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.stdout.split() == ["no", "torch", "2"], r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


@needs_library
@pytest.mark.parametrize("recipe, needle", [
    ({"exclude": ["*"]}, "remove every target"),
    ({"exclude": ["model.layers.99.*"]}, "exclude 'model.layers.99.*' matches no module"),
])
def test_recipes_that_select_no_site_or_exclude_nothing_are_errors(tmp_path, recipe, needle):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"name": "r", "pattern": "8:16", **recipe}))
    one_error(run_cli("transform", tiny_export("llama"), tmp_path / "o", "--recipe", f), needle)


@needs_library
def test_messages_name_the_option_and_the_fault(tmp_path):
    one_error(run_cli("evaluate", tiny_export("llama"), "--ppl", tmp_path / "missing.txt"),
              "--ppl '" + str(tmp_path / "missing.txt") + "' is neither 'wikitext2' nor")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    shutil.copy(tiny_export("llama") / "model.onnx", no_tok / "model.onnx")
    one_error(run_cli("evaluate", no_tok, "--limit", "1"), "pass --tokenizer DIR")
    afile = tmp_path / "cal.json"
    afile.write_text("{}")
    one_error(run_cli("transform", tiny_export("llama"), tmp_path / "o", "--recipe", "8:16-static-shift",
                      "--calibration", afile), "is a file; --calibration takes the directory")
    sparse = tmp_path / "sparse"
    assert run_cli("transform", tiny_export("llama"), sparse, "--recipe", "8:16-magnitude").returncode == 0
    r = run_cli("inspect", sparse)
    assert r.returncode == 0 and r.stdout.startswith("transformed by nm-onnx") and "14 sparse sites" in r.stdout
    one_error(run_cli("transform", sparse, tmp_path / "twice", "--recipe", "8:16-magnitude"), "already transformed")


def test_calibration_of_another_model_is_named(tmp_path):
    cal = tmp_path / "cal"
    r = run_cli("calibrate", tiny_hf("qwen2"), "--recipe", "8:16-static-shift", "--samples", "2", "--seqlen", "32",
                "--out", cal, "--quiet")
    assert r.returncode == 0, r.stderr
    # the tiny qwen2 and llama share module names and shapes: give the artifact other shapes
    bad = tmp_path / "bad-cal"
    shutil.copytree(cal, bad)
    rep = json.loads((bad / "report.json").read_text())
    rep["sites"] = {m: [k, 2 * o] for m, (k, o) in rep["sites"].items()}
    (bad / "report.json").write_text(json.dumps(rep))
    (bad / "nm_onnx_manifest.json").unlink()
    one_error(run_cli("transform", tiny_export("llama"), tmp_path / "o", "--recipe", "8:16-static-shift",
                      "--calibration", bad), "was calibrated on")


def test_internal_errors_are_a_bug_report_not_a_traceback(monkeypatch, capsys, tmp_path):
    """An unexpected exception: one line, exit 3, the traceback saved to a file."""
    from nm_onnx import cli
    from nm_onnx.commands import recipes

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(recipes, "run", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert cli.main(["recipes"]) == 3
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "internal error (ZeroDivisionError: boom)" in lines[0] and "This is a bug" in lines[0]
    saved = list(tmp_path.glob("nm-onnx-recipes-error-*.txt"))
    assert len(saved) == 1 and "ZeroDivisionError" in saved[0].read_text()


# ------------------------------------------------------------------------------ 4. non-finite weights
@needs_library
def test_transform_refuses_a_non_finite_weight_naming_the_site(tmp_path):
    bad = tmp_path / "inf"
    shutil.copytree(tiny_export("llama"), bad)
    m = onnx.load(str(bad / "model.onnx"))
    from nm_onnx.graph import find_linear_sites, load_model

    site = next(s for s in find_linear_sites(load_model(tiny_export("llama"))) if s.kind == "down")
    init = next(t for t in m.graph.initializer if t.name == site.weight)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[7] = np.inf
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(bad / "model.onnx"))
    one_error(run_cli("transform", bad, tmp_path / "o", "--recipe", "8:16-magnitude"),
              f"site '{site.module}': weight '{site.weight}' holds 1 non-finite value(s)")
    assert not (tmp_path / "o").exists()
