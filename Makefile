# Two entry points, each self-contained on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the CPU build of torch and sgsc (building the C++ kernels), then run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch the C++ kernels are built against. Which build comes depends on the pip index: PyPI serves
# Linux the CUDA build (~5 GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU one.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.sgsc-installed

.PHONY: install demo test test-isa test-torch-compat bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/sgsc demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The kernel and training-outcome tests again on the paths of smaller CPUs: forced down to AVX2 (torch's
# kernels, oneDNN's and ours) and, for our kernels, the scalar path. Inductor's cache key ignores
# ATEN_CPU_CAPABILITY, so the forced pass compiles into a cache of its own.
ISA_CACHE := $(shell mktemp -d -u /tmp/sgsc-inductor-avx2.XXXXXX)
test-isa: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SGSC_CPU_ISA=avx2 TORCHINDUCTOR_CACHE_DIR=$(ISA_CACHE) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/ops tests/train
	rm -rf $(ISA_CACHE)
	SGSC_CPU_ISA=scalar $(BIN)/python -m pytest -q -p no:cacheprovider tests/ops

# One wheel, built once against the torch above, tested beside torch 2.13.0 and 2.14.1 in fresh
# environments under /tmp (about 5.5 GB for 2.14's CUDA build); not part of `make test` or CI.
test-torch-compat: $(STAMP)
	PYTHON=$(PYTHON) BUILD_PYTHON=$(BIN)/python scripts/check_torch_compat.sh

bench: $(STAMP)
	$(BIN)/python bench/bench_fake_quantize.py
	$(BIN)/python bench/bench_bitpack.py
	$(BIN)/python bench/bench_codec.py

clean:
	rm -rf $(VENV) build *.egg-info sgsc/_C*.so
