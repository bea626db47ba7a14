# `make demo` and `make test` work from a fresh clone with only Python 3.11 installed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The analysis report test renders its HTML page in Debian's headless Chromium.
CHROMIUM := /usr/bin/chromium

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Installed when apt-get can (root on Debian); without it that one test skips and says why.
$(CHROMIUM):
	-export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

demo: $(STAMP)
	$(BIN)/python -m edgequant.demo.job

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/qat_overhead.py
	$(BIN)/python benchmarks/qat_accuracy.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# Peer PTQ tools for benchmarks/ptq_population.py in a venv of their own, never the library's
# dependencies; pip (not uv) takes torch 2.14.1 from local disk and constraints.txt keeps it there.
PEERS_VENV := .venv-peers

.PHONY: bench-peers
bench-peers:
	test -x $(PEERS_VENV)/bin/python || python3.11 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -c constraints.txt -e .
	$(PEERS_VENV)/bin/pip install --quiet -c constraints.txt -r benchmarks/peers-requirements.txt
	$(PEERS_VENV)/bin/python benchmarks/peers.py --list

# Model coverage (docs/coverage.md): every torchvision model, then the timm list in benchmarks/zoo.py.
# timm comes from the `zoo` extra, for the benchmark only; constraints.txt keeps torch at its pin.
# Random weights (timm's pretrained=False): nothing is downloaded. About an hour on 2 cores.
.PHONY: bench-zoo
bench-zoo: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,zoo]'
	nice -n 19 $(BIN)/python benchmarks/zoo.py
	nice -n 19 $(BIN)/python benchmarks/zoo.py --library timm
