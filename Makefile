# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo   label and evaluate FER2013 val (or DATA=...) with the packaged model, then a short training run
#   make test   the test suite, less the tests marked slow (make test-all runs those too)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/fer2013
PYTEST_ARGS ?=

.PHONY: demo test test-all test-fast install clean

# pip's own chatter goes to .venv/install.log; it is printed only if the install fails.
$(BIN)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing ray-fer and its pinned dependencies into $(VENV) (log: $(VENV)/install.log)"
	@{ $(BIN)/python -m pip install -q --upgrade pip \
	   && $(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'; } > $(VENV)/install.log 2>&1 \
	   || { tail -n 40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log" >&2; exit 1; }
	@touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	@DATA="$(DATA)" PATH="$(CURDIR)/$(BIN):$$PATH" bash jobs/demo.sh

test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not integration and not cluster" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs out .pytest_cache
