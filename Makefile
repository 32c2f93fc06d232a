# hybrid-gguf: one-command setup. `make run` and `make test` create .venv, build the
# hybrid-patched llama-cpp-python (cached under ~/.cache/hybrid-gguf/wheels), and install.
# Both are thin calls of the package: `python -m hybrid_gguf.backend` (the same as
# `hybrid-gguf backend install`, but runnable before the dependencies are installed).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hybrid-gguf-installed

.PHONY: setup run test backend backend-stock clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the backend first: then `pip install -e .` finds llama-cpp-python==0.3.36 satisfied
# instead of compiling a second, unpatched copy from PyPI
$(STAMP): $(PY) pyproject.toml patches/llama-cpp-hybrid.patch hybrid_gguf/backend/__init__.py
	$(PY) -m hybrid_gguf.backend install
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

backend: $(PY)
	$(PY) -m hybrid_gguf.backend install

backend-stock: $(PY)
	$(PY) -m hybrid_gguf.backend install --stock

run: setup
	$(VENV)/bin/hybrid-gguf run -p "def fibonacci(n):" -n 64

test: setup
	HYBRID_GGUF_REQUIRE_PATCHED=1 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
