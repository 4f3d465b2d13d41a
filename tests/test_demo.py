"""`nm-onnx demo` end to end on a tiny random model (the SmolLM2 run is `make demo`): every stage runs,
the report table and the plot appear, the ORT numbers agree with the PyTorch twin, reruns use the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models_cache import tiny_export, tiny_hf

from nm_onnx import ops
from nm_onnx.io import write_manifest

pytestmark = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


def _demo(out, *extra):
    import shutil

    if "--only" in extra and "8:16-median-variance" not in extra[-1] and not (out / "dense").exists():
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, "demo")  # as an earlier demo run would have left it
        shutil.copytree(tiny_export("llama"), out / "dense")  # the demo reuses an existing export
    return subprocess.run(
        [sys.executable, "-m", "nm_onnx", "demo", "--model", str(tiny_hf("llama")), "--out", str(out),
         "--limit", "3", "--seqlen", "64", "--calib-samples", "2", "--calib-seqlen", "32", "--prompt", "16",
         "--decode", "2", "--repeats", "1", "--twin-limit", "2", *extra],
        check=False, capture_output=True, text=True, timeout=900,
    )


def test_demo_unknown_row_is_a_clear_error(tmp_path):
    r = _demo(tmp_path / "demo", "--only", "8:16-median-variance,8:16-magnitude")
    assert r.returncode == 2 and "--only: unknown ['8:16-median-variance']" in r.stderr  # not in the grid
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("only", [
    "8:16-magnitude,8:16",
    pytest.param("8:16-magnitude,8:16-learned-shift,8:16", marks=pytest.mark.slow),  # + calibration
])
def test_demo_tiny_end_to_end(tmp_path, only):
    out = tmp_path / "demo"
    r = _demo(out, "--only", only)
    assert r.returncode == 0, r.stderr[-3000:]
    n_rows = len(only.split(",")) + 1
    assert "[demo" in r.stderr and f"row {n_rows}/{n_rows}" in r.stderr  # progress on stderr
    md = (out / "report.md").read_text()
    assert "| config | sparsity | perplexity | Δ vs dense | torch twin | decode speedup | prefill speedup |" in md
    labels = ["dense", "8:16 magnitude", "8:16 weight pruning (magnitude)"]
    labels += ["8:16 + learned shift"] if "learned" in only else []
    for label in labels:
        assert f"| {label} |" in md
    assert (out / "ppl_vs_pattern.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["config"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    for name in [lbl for lbl in labels if "weight" not in lbl]:
        row = rows[name]
        assert row["notes"] == [], row["notes"]
        # the deployed ORT path equals the PyTorch twin on the same windows
        assert abs(row["ppl_ort_twin_windows"] / row["ppl_torch"] - 1) < 1e-3, row
    assert rows["8:16 magnitude"]["decode_speedup"] > 0 and rows["8:16 magnitude"]["prefill_speedup"] > 0
    assert rows["8:16 weight pruning (magnitude)"]["ppl_torch"] > 0
    assert (out / "sparse" / "8:16-magnitude" / "model.onnx").is_file()
    # a rerun with the same settings reuses every row
    r2 = _demo(out, "--only", only)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count(": cached") == n_rows
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == n_rows + 1 and table == [ln for ln in r2.stdout.splitlines() if ln.startswith("| ")]
