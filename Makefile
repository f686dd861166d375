# `make demo` and `make test` each set everything up on a fresh machine, then run.
# Setup is idempotent: the stamp file records a finished install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo tour test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The quick configuration of the embedded default (20 profiles): trains once (~6 min, plus ~6 min for its retain-only oracle), then fits, evaluates, plots.
demo: $(STAMP)
	$(BIN)/python -m eraser.cli demo --quick --out runs/demo

tour: $(STAMP)
	$(BIN)/python -m analyses.interp_tour

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
