# One source of truth for setup, serving and tests. CI calls `make test` through .ci/run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned in the SAME pip call as everything that depends on it (nixl, transformers),
# otherwise pip pulls a CUDA build of several GB.
PIP_PKGS := torch==2.13.0 transformers==5.24.0 safetensors tokenizers pillow numpy msgpack \
	pyzmq aiohttp hydra-core==1.3.8 mpi4py mpich submitit nixl==1.5.1 \
	pytest pytest-timeout openai

.PHONY: setup serve test test-slow test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PIP_PKGS)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# E/P/D on this machine (4 ranks: frontend, encode, prefill, decode) with the default model.
# exec: mpirun is make's child, so a SIGTERM to make (which make passes to its children)
# reaches mpirun, which passes it to the ranks; Ctrl-C reaches them through mpirun as well.
serve: setup
	OMP_NUM_THREADS=1 exec $(BIN)/mpirun -n 4 $(BIN)/python -m mmhpc deployment=e_p_d $(ARGS)

test: setup
	OMP_NUM_THREADS=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	OMP_NUM_THREADS=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m slow $(ARGS)

clean:
	rm -rf $(VENV) build .cache
