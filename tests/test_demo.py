"""`nm-onnx demo` end to end on a tiny random model (the SmolLM2 run is `make demo`): it is the sweep of
its built-in spec (OUT/spec.toml), every stage runs, the report table and the plot appear, the ORT numbers
agree with the PyTorch twin, reruns use the cache; the autotuned rows (slow) meet their budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models_cache import tiny_export, tiny_hf, wide_export

from nm_onnx import ops

pytestmark = pytest.mark.skipif(not ops.library_available(), reason="op library not built (make ops)")


def _demo(out, *extra, wide=False):
    # the demo reuses an existing export; the autotuned rows need sites where the sparse op saves time (wide)
    export = wide_export() if wide else tiny_export("llama")
    hf = export.parent / "wide-llama-hf" if wide else tiny_hf("llama")
    return subprocess.run(
        [sys.executable, "-m", "nm_onnx", "demo", "--model", str(hf), "--out", str(out), "--export", str(export),
         "--limit", "3", "--seqlen", "64", "--calib-samples", "2", "--calib-seqlen", "32", "--prompt", "16",
         "--decode", "2", "--repeats", "1", "--twin-limit", "2", "--autotune-samples", "2", *extra],
        check=False, capture_output=True, text=True, timeout=1500,
    )


def test_demo_unknown_row_is_a_clear_error(tmp_path):
    r = _demo(tmp_path / "demo", "--only", "8:16-median-variance,8:16-magnitude")
    assert r.returncode == 2 and "--only: unknown ['8:16-median-variance']" in r.stderr  # not in the grid
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("only", [
    "8:16-magnitude,8:16",
    pytest.param("8:16-magnitude,8:16-learned-shift,8:16,autotune:+25%", marks=pytest.mark.slow),  # + calibration
])
def test_demo_tiny_end_to_end(tmp_path, only):
    out = tmp_path / "demo"
    r = _demo(out, "--only", only, wide="autotune" in only)
    assert r.returncode == 0, r.stderr[-3000:]
    n_rows = len(only.split(",")) + 1
    assert "[demo" in r.stderr and "[sweep" in r.stderr and "jobs (local)" in r.stderr  # progress on stderr
    assert "[[models]]" not in (spec := (out / "spec.toml").read_text()) and "[evaluations.twin]" in spec
    md = (out / "report.md").read_text()
    assert "| config | sparsity | perplexity | Δ vs dense | torch twin | decode speedup | prefill speedup |" in md
    labels = ["dense", "8:16 magnitude", "8:16 weight pruning (magnitude)"]
    labels += ["8:16 + learned shift", "autotune +25%"] if "learned" in only else []
    for label in labels:
        assert f"| {label} |" in md
    assert (out / "ppl_vs_pattern.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["config"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    for name in [lbl for lbl in labels if "weight" not in lbl]:
        row = rows[name]
        tuned_over = name.startswith("autotune") and not row["autotune"]["within_budget"]
        over = ("autotune +25%: no round verified within the budget; the recipe is the tightest one tried "
                f"(perplexity {row['autotune']['verified_ppl']:.3f})") if tuned_over else None
        assert row["notes"] == ([over] if over else []), row["notes"]
        # the deployed ORT path equals the PyTorch twin on the same windows
        assert abs(row["ppl_ort_twin_windows"] / row["ppl_torch"] - 1) < 1e-3, row
    assert rows["8:16 magnitude"]["decode_speedup"] > 0 and rows["8:16 magnitude"]["prefill_speedup"] > 0
    assert rows["8:16 weight pruning (magnitude)"]["ppl_torch"] > 0
    assert rows["8:16 magnitude"]["sparsity"] == 0.5 and rows["dense"]["sparsity"] == 0.0
    if "autotune" in only:
        tuned = rows["autotune +25%"]  # verified on the demo's own windows: the same perplexity
        assert tuned["autotune"]["verified_ppl"] == pytest.approx(tuned["ppl_ort"], rel=1e-6)
        assert tuned["autotune"]["within_budget"] == (tuned["ppl_ort"] <= 1.25 * rows["dense"]["ppl_ort"])
        assert 0 < tuned["sparsity"] < 1 and tuned["decode_speedup"] > 0
    assert len(list((out / "cache" / "transform").iterdir())) == (2 if "autotune" in only else 1) + ("learned" in only)
    # a rerun with the same settings reuses every job
    r2 = _demo(out, "--only", only, wide="autotune" in only)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert ": computed" not in r2.stderr and ": cached" in r2.stderr, r2.stderr[-2000:]
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == n_rows + 1 and table == [ln for ln in r2.stdout.splitlines() if ln.startswith("| ")]
