# The README's two commands are `make demo` and `make test`; both create .venv when missing.
PYTHON ?= .venv/bin/python
VENV_STAMP = .venv/.installed

.PHONY: demo test test-slow lint typecheck up lab notebooks bench bench-quick clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -e ".[dev]"
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

# The main job: the crash-and-rebuild demo on the embedded stack (or DATABASE_URL/REDIS_URL).
demo: $(if $(filter .venv/bin/python,$(PYTHON)),$(VENV_STAMP))
	$(PYTHON) -m toolkit demo

# The whole test suite: unit, integration and notebooks (nbval). Fails on any skip.
test: $(if $(filter .venv/bin/python,$(PYTHON)),$(VENV_STAMP))
	$(PYTHON) -m pytest

test-slow: $(if $(filter .venv/bin/python,$(PYTHON)),$(VENV_STAMP))
	$(PYTHON) -m pytest -m slow

lint:
	$(PYTHON) -m ruff check toolkit tests benchmarks

typecheck:
	$(PYTHON) -m mypy

up:
	$(PYTHON) -m toolkit up

clean:
	rm -rf .venv .ci/venv build dist *.egg-info

# Benchmarks (benchmarks/README.md): toolkit vs the raw floor and its peers, same run, same servers.
# bench: full N on both targets (tens of minutes); bench-quick: small N, one target, exits 0 on misses.
bench:
	$(PYTHON) -m benchmarks.run --target both

bench-quick:
	$(PYTHON) -m benchmarks.run --quick

# Notebooks: re-execute in place and normalize (twice in a row gives byte-identical files);
# check that the stored ones are clean (no kernel); open them in JupyterLab.
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))

.PHONY: notebooks-check

notebooks:
	$(PYTHON) notebooks/tools.py run $(NOTEBOOKS)

notebooks-check:
	$(PYTHON) notebooks/tools.py check $(NOTEBOOKS)

lab:
	cd notebooks && $(abspath $(PYTHON)) -m jupyter lab --ip=127.0.0.1 --no-browser
