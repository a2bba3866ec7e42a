# Two entry points, each self-contained on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the CPU build of torch and sgsc (building the C++ kernels), then run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch: a bare `pip install torch` pulls several GB of CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sgsc-installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/sgsc demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_fake_quantize.py
	$(BIN)/python bench/bench_bitpack.py
	$(BIN)/python bench/bench_codec.py

clean:
	rm -rf $(VENV) build *.egg-info sgsc/_C*.so
