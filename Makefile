# The two commands of README.md: `make demo` and `make test` install what is missing first.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: install demo demo-down test lint type unit integration e2e bench faults clean

install:
	@bash scripts/install.sh

demo: install
	@DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

demo-down:
	@$(VENV)/bin/rbd-restore dev down --dir $(DEMO_DIR)/cluster --purge

lint: install
	$(VENV)/bin/ruff check rbd_restore tests bench faults scripts

type: install
	$(VENV)/bin/mypy rbd_restore bench tests faults scripts

unit: install
	$(VENV)/bin/pytest -q tests/unit

integration: install
	$(VENV)/bin/pytest -q tests/integration

e2e: install
	$(VENV)/bin/pytest -q tests/e2e

# One pytest run shares one embedded cluster across integration and e2e tests.
test: install lint type
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: install
	$(PY) -m bench.run

# The fault soak (docs/reliability.md): stops by itself, writes faults/results/latest.md.
faults: install
	$(PY) -m faults.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
