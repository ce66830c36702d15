# Two entry points (see README): `make run` and `make test`.  Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU build of torch (plain `torch` can resolve to a multi-GB CUDA build)
	$(PIP) install 'torch==2.13.0'
	$(PIP) install -e '.[test]'
	# the ONNX exporter has its own pinned transformers: installed beside, not into, the environment
	$(VENV)/bin/edgequant setup-onnx
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/edgequant run

test: setup
	$(VENV)/bin/pytest

clean-venv:
	rm -rf $(VENV)
