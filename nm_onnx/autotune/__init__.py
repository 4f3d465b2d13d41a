"""`nm-onnx autotune`: per-site N:M patterns that are as fast as possible within a perplexity budget.

Modules, down the pipeline: `spec` (budget, candidates, site groups), `sensitivity` (predicted loss
increase per group and pattern, PyTorch reference, calibration text), `speed` (measured decode time
saved per site shape, ORT), `allocate` (exact knapsack, the recipe it gives), `verify` (transform +
ORT perplexity + bench), `report` (JSON, Markdown, frontier plot), `run` (the whole, resumable).
Only `sensitivity` and `run` import torch. How it works: docs/autotune.md.
"""
