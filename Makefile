# Two entry points (see README): `make run` and `make test`.  Both set up .venv first; `make test` (and the
# fast tier, `make test-fast`) first checks the system packages the tests need (.ci/system-deps).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test test-fast system-deps clean-venv
# the system packages (compilers among them) come before the venv's build
.NOTPARALLEL:

# each setup step prints one line; pip's full output goes to $(SETUP_LOG), named if a step fails
SETUP_LOG ?= build/setup.log
STEP := .ci/step $(SETUP_LOG)

$(VENV)/.installed: pyproject.toml
	@$(STEP) "creating the virtualenv $(VENV)" python3 -m venv $(VENV)
	@$(STEP) "upgrading pip" $(PIP) install --upgrade pip
	@# the CPU build of torch (plain `torch` can resolve to a multi-GB CUDA build)
	@$(STEP) "installing torch 2.13.0 (CPU build)" $(PIP) install 'torch==2.13.0'
	@$(STEP) "installing edgequant and its dependencies (llama-cpp-python builds from source: about 4 min the first time)" $(PIP) install -e '.[test]'
	@# the ONNX exporter has its own pinned transformers: installed beside, not into, the environment
	@$(STEP) "installing the ONNX exporter" $(VENV)/bin/edgequant setup-onnx
	@touch $@

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
