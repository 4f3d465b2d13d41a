#!/usr/bin/env bash
# Shared selection on the optimum graph (benchmarks/RESULTS.md, "Shared selection and packed sites"):
# 8:16-magnitude+shared (q/k/v and gate/up packed into one NMSparseMatMul each) against 8:16-magnitude
# (one NMSparseMatMul per projection), against dense, and a dense model with the same packing only.
# Plain ORT sessions (`nm-onnx bench`: each pair interleaved in one process, medians of pair ratios).
#
#   bash benchmarks/shared_decode.sh RUNS   # RUNS/o = nm-onnx export smollm2-135m RUNS/o (or any export)
set -euo pipefail
R=${1:?usage: shared_decode.sh RUNS_DIR}
PY=${PYTHON:-.venv/bin/python}
NM=${NMONNX:-.venv/bin/nm-onnx}
export HF_HUB_OFFLINE=1
[ -d "$R/o-8x16" ] || "$NM" transform "$R/o" "$R/o-8x16" --recipe 8:16-magnitude >/dev/null
[ -d "$R/o-8x16-shared" ] || "$NM" transform "$R/o" "$R/o-8x16-shared" --recipe 8:16-magnitude+shared >/dev/null
[ -d "$R/o-packed" ] || "$PY" benchmarks/pack_dense.py "$R/o" "$R/o-packed"
pair() {  # baseline model threads
  echo "## $2 vs $1, $3 threads; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$NM" bench "$R/$2" --baseline "$R/$1" --threads "$3" --prompt 128 --decode 32 --repeats 7 --top 0 2>/dev/null \
    | grep -E "^\| |speedup"
}
for t in 1 2; do
  pair o-8x16 o-8x16-shared $t
  pair o o-8x16-shared $t
  pair o o-8x16 $t
  pair o o-packed $t
done
