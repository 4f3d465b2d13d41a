# nm-onnx: every target sets the project up first when .venv is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
NMONNX := $(VENV)/bin/nm-onnx
STAMP  := $(VENV)/.nm-onnx-installed
# ORT GenAI's model builder needs transformers 5: its own venv (requirements-genai-builder.txt, docs/genai.md).
GENAI_VENV  ?= .venv-genai
GENAI_STAMP := $(GENAI_VENV)/.nm-onnx-genai-installed
WHEELS      := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: setup genai-env ops demo test test-all test-asan bench gpu-check clean

setup: $(STAMP) ops genai-env

# torch first (the pinned CPU build), so nothing later pulls a CUDA build of torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(WHEELS) "torch==2.13.0"
	$(PY) -m pip install -e ".[eval,dev,genai,cluster]"
	touch $@

# The builder environment (`nm-onnx export --format genai`); torch from the same pinned CPU wheel, first.
genai-env: $(GENAI_STAMP)

$(GENAI_STAMP): requirements-genai-builder.txt
	test -x $(GENAI_VENV)/bin/python || python3 -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install --upgrade pip
	$(GENAI_VENV)/bin/python -m pip install $(WHEELS) "torch==2.13.0"
	$(GENAI_VENV)/bin/python -m pip install $(WHEELS) -r requirements-genai-builder.txt
	touch $@

# The custom op library (C++ CPU kernels, CUDA kernels when nvcc is present).
ops: $(STAMP)
	PYTHON=$(PY) bash custom_ops/build.sh

demo: setup
	$(NMONNX) demo

# Two pytest workers (pytest-xdist): the suite is mostly single-threaded Python (CLI subprocesses that
# import torch and transformers), so two workers on two cores take ~0.6x the time; the test-export cache
# (tests/models_cache.py) is shared under a file lock. TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 2

test: setup
	$(PY) -m pytest -m "not slow" -q -n $(TEST_JOBS)

# One process: the slow tests hold full models in memory.
test-all: setup
	$(PY) -m pytest -q

test-asan: $(STAMP)
	PYTHON=$(PY) bash custom_ops/test_asan.sh

bench: setup
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/sparse_matmul.py

# One-run check of the CUDA kernels on a GPU (tools/gpu_check.sh; docs/ops.md "CUDA check"). No setup:
# it needs nvcc and a python3 with numpy (and PyTorch with CUDA on the GPU), not this project's venv.
GPU_CHECK_OUT    ?= runs/gpu_check
GPU_CHECK_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) bash tools/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf custom_ops/build custom_ops/build-asan
