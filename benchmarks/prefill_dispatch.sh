#!/usr/bin/env bash
# Prefill dispatch (transform --prefill-dispatch 2) against the dense model and the plain 8:16 model:
# og.Generator on the GenAI builder graph and a plain ORT session on the optimum graph, 1 and 2 threads,
# prompt 128 (+32 decode steps) and 512 (prefill only); every triple interleaved in one process, medians
# of pair ratios (genai_decode.py, bench); then resident memory per model (model_memory.py).
#
#   bash benchmarks/prefill_dispatch.sh RUNS   # RUNS holds g and o (nm-onnx export smollm2-135m RUNS/g
#                                              # --format genai; nm-onnx export smollm2-135m RUNS/o)
#   (results: benchmarks/RESULTS.md, "Prefill dispatch")
set -euo pipefail
R=${1:?usage: prefill_dispatch.sh RUNS_DIR}
PY=${PYTHON:-.venv/bin/python}
NM=${NMONNX:-.venv/bin/nm-onnx}
export HF_HUB_OFFLINE=1
for x in g o; do
  for v in 8x16 8x16-d2; do
    [ -e "$R/$x-$v" ] && continue
    extra=(); [ "$v" = 8x16-d2 ] && extra=(--prefill-dispatch 2)
    "$NM" transform "$R/$x" "$R/$x-$v" --recipe 8:16-magnitude "${extra[@]}" | tail -1
  done
done
og() {  # threads prompt decode repeats
  echo "## og.Generator, $1 threads, prompt $2, decode $3; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" benchmarks/genai_decode.py "$R/g" "$R/g-8x16" "$R/g-8x16-d2" --threads "$1" --prompt "$2" --decode "$3" \
    --repeats "$4" 2>/dev/null | grep -E "^\|"
}
plain() {  # model threads prompt decode repeats
  echo "## plain session $1 vs o, $2 threads, prompt $3, decode $4; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$NM" bench "$R/$1" --baseline "$R/o" --threads "$2" --prompt "$3" --decode "$4" --repeats "$5" --top 0 \
    2>/dev/null | grep -E "speedup"
}
for t in 1 2; do
  og $t 128 32 7
  og $t 512 0 5
  for m in o-8x16 o-8x16-d2; do plain $m $t 128 32 7; plain $m $t 512 0 5; done
done
echo "## resident memory (1 thread); load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" benchmarks/model_memory.py "$R/g" "$R/g-8x16" "$R/g-8x16-d2" "$R/o" "$R/o-8x16" "$R/o-8x16-d2" 2>/dev/null
