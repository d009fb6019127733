# The two commands a newcomer types (README): `make demo` and `make test`.
# Each creates .venv when missing and installs torch first (TORCH_SPEC; CUDA users override it,
# e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."), then the project with its dev extras.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# llama-cpp-python builds from source; without these flags it compiles for the host's own CPU
# (GGML_NATIVE), and its float results then follow the machine: the pinned stories260K GGUF
# perplexities moved by up to 1.3e-3 between an AVX-512 Intel and an AVX-512 AMD host. A fixed
# x86-64-v3 instruction set (AVX2, FMA, F16C, BMI2) runs the same kernels, so gives the same bits,
# on every x86 machine. Set LLAMA_CPP_CMAKE_ARGS= (empty) for a native, faster build; a CMAKE_ARGS
# of your own (e.g. -DGGML_CUDA=on) is added after these.
ifeq ($(shell uname -m),x86_64)
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/llamaflow demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/convert.py

clean:
	rm -rf workspace .pytest_cache
