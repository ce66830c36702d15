# Two entry points (see README): `make run` and `make test`.  Both set up .venv first; `make test` (and the
# fast tier, `make test-fast`) first checks the system packages the tests need (.ci/system-deps).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test test-fast system-deps clean-venv
# the system packages (compilers among them) come before the venv's build
.NOTPARALLEL:

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

system-deps:
	@.ci/system-deps

test: system-deps setup
	$(VENV)/bin/pytest

# the inner loop: every module, without the slow end-to-end tests (pytest -m "not slow")
test-fast: system-deps setup
	$(VENV)/bin/pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
