# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv, install the CPU build of torch first (pinned, so pip does not pull CUDA
# wheels), then this package in editable mode.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
DEMO   := demo_out

.PHONY: setup testdeps demo test test-slow bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash scripts/demo.sh $(DEMO)

# System packages some tests need (a browser, RELION): each scripts/testdeps/*.sh is idempotent and
# exits 0 with a printed reason when it cannot install; the tests that need it then skip.
testdeps: setup
	@for f in scripts/testdeps/*.sh; do [ -e "$$f" ] && BIN=$(BIN) bash "$$f" || true; done

# OpenMP threads yield instead of spinning, as under the `cryoscape` entry point (tests run torchrun
# children and browsers beside pytest on 2 cores).
test: setup testdeps
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

test-slow: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(DEMO) build src/*.egg-info
