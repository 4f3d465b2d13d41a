#!/usr/bin/env bash
# Issue 14's decode/prefill table: dense vs 8:16 magnitude (lm_head dense) through og.Generator (GenAI
# builder graphs) and plain ORT sessions (optimum graphs), 1 and 2 threads, prompt 128 (+32 or 16 decode
# steps) and 512. Every pair interleaved in one process; medians of pair ratios (genai_decode.py, bench).
#
#   bash benchmarks/deploy_decode.sh RUNS    # RUNS holds the directories below, made by
#     nm-onnx export smollm2-135m RUNS/g --format genai;  nm-onnx export smollm2-135m RUNS/o
#     python benchmarks/random_hf.py RUNS/hf-1.7b-random
#     nm-onnx export RUNS/hf-1.7b-random RUNS/g-1.7b --format genai;  nm-onnx export RUNS/hf-1.7b-random RUNS/o-1.7b
#     nm-onnx transform RUNS/X RUNS/X-8x16 --recipe 8:16-magnitude    # X in g, o, g-1.7b, o-1.7b
#   (about 35 GB of disk and 20 GB of memory for the 1.7B pairs; results: benchmarks/RESULTS.md,
#   "Deployment decode table")
set -euo pipefail
R=${1:?usage: deploy_decode.sh RUNS_DIR}
PY=${PYTHON:-.venv/bin/python}
NM=${NMONNX:-.venv/bin/nm-onnx}
export HF_HUB_OFFLINE=1
og() {  # dense sparse threads prompt decode repeats
  echo "## og.Generator $1 vs $2, $3 threads, prompt $4, decode $5; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" benchmarks/genai_decode.py "$R/$1" "$R/$2" --threads "$3" --prompt "$4" --decode "$5" --repeats "$6" 2>/dev/null
}
plain() {  # dense sparse threads prompt decode repeats
  echo "## plain session $1 vs $2, $3 threads, prompt $4, decode $5; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$NM" bench "$R/$2" --baseline "$R/$1" --threads "$3" --prompt "$4" --decode "$5" --repeats "$6" --top 0 2>/dev/null \
    | grep -E "^\| |speedup"
}
for t in 1 2; do
  og g g-8x16 $t 128 32 7
  og g g-8x16 $t 512 0 5
  plain o o-8x16 $t 128 32 7
  plain o o-8x16 $t 512 0 5
  og g-1.7b g-1.7b-8x16 $t 128 16 5
  og g-1.7b g-1.7b-8x16 $t 512 0 3
  plain o-1.7b o-1.7b-8x16 $t 128 16 3
  plain o-1.7b o-1.7b-8x16 $t 512 0 3
done
