# The README's two commands are `make demo` and `make test`. Every target that runs Python
# creates .venv when missing (unless PYTHON names another interpreter, as .ci/run does).
PYTHON ?= .venv/bin/python
VENV_STAMP = .venv/.installed
VENV = $(if $(filter .venv/bin/python,$(PYTHON)),$(VENV_STAMP))

.PHONY: venv demo test test-slow test-system lint typecheck up lab notebooks notebooks-check \
	bench bench-quick clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -e ".[dev]"
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

# The main job: the crash-and-rebuild demo on the embedded stack (or DATABASE_URL/REDIS_URL).
demo: $(VENV)
	$(PYTHON) -m toolkit demo

# The test suite: unit, integration and notebooks (nbval); needs only Python. Fails on any skip.
# Its last lines name the `system` tests it left out (they need Debian packages).
test: $(VENV)
	$(PYTHON) -m pytest

test-slow: $(VENV)
	$(PYTHON) -m pytest -m slow

# The tests that need programs pip cannot install (apt-get install chromium pgbouncer
# postgresql redis-server): the browser, PgBouncer, TLS Redis and SSL PostgreSQL.
test-system: $(VENV)
	$(PYTHON) -m pytest -m system

lint: $(VENV)
	$(PYTHON) -m ruff check toolkit tests benchmarks

typecheck: $(VENV)
	$(PYTHON) -m mypy

up: $(VENV)
	$(PYTHON) -m toolkit up

clean:
	rm -rf .venv .ci/venv build dist *.egg-info

# Benchmarks (benchmarks/README.md): toolkit vs the raw floor and its peers, same run, same servers.
# bench: full N on both targets (tens of minutes); bench-quick: small N, one target, exits 0 on misses.
bench: $(VENV)
	$(PYTHON) -m benchmarks.run --target both

bench-quick: $(VENV)
	$(PYTHON) -m benchmarks.run --quick

# Notebooks: re-execute in place and normalize (twice in a row gives byte-identical files);
# check that the stored ones are clean (no kernel); open them in JupyterLab.
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))

notebooks: $(VENV)
	$(PYTHON) notebooks/tools.py run $(NOTEBOOKS)

notebooks-check: $(VENV)
	$(PYTHON) notebooks/tools.py check $(NOTEBOOKS)

# Jupyter refuses to run as root unless told (containers often run as root).
lab: $(VENV)
	cd notebooks && $(abspath $(PYTHON)) -m jupyter lab --ip=127.0.0.1 --no-browser \
		$(if $(filter 0,$(shell id -u)),--allow-root)
