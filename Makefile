# The two commands of README.md: `make demo` and `make test` install what is missing first.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: install install-openstack demo demo-down test lint type unit integration e2e \
	openstack-test bench faults clean

install:
	@bash scripts/install.sh

install-openstack: install
	@bash scripts/install-openstack.sh

demo: install
	@DEMO_DIR=$(DEMO_DIR) $(PY) scripts/demo.py

demo-down:
	@$(VENV)/bin/rbd-restore dev down --dir $(DEMO_DIR)/cluster --purge

lint: install
	$(VENV)/bin/ruff check rbd_restore tests bench faults scripts contrib/openstack

type: install
	$(VENV)/bin/mypy rbd_restore bench tests faults scripts contrib/openstack

unit: install
	$(VENV)/bin/pytest -q tests/unit

integration: install
	$(VENV)/bin/pytest -q tests/integration

e2e: install
	$(VENV)/bin/pytest -q tests/e2e

# One pytest run shares one embedded cluster across integration and e2e tests; the
# tests that import Cinder run in processes of their own (Cinder's eventlet never meets
# the fetcher), on Debian's Cinder 21 (Zed) and on PyPI's current Cinder.
test: install install-openstack lint type
	$(VENV)/bin/pytest -q -p no:cacheprovider tests
	@$(MAKE) --no-print-directory openstack-test

CINDER_TESTS := cd contrib/openstack &&
openstack-test: install-openstack
	$(CINDER_TESTS) PYTHONPATH=.:../.. /usr/bin/python3 -W ignore -m cinder_tests.rbd_subclass
	$(CINDER_TESTS) ../../.venv-cinder/bin/python -W ignore -m cinder_tests.rbd_subclass
	$(CINDER_TESTS) PYTHONPATH=.:../.. /usr/bin/python3 -m pytest -q -p no:cacheprovider \
		-W ignore -m "not services" cinder_tests
	$(CINDER_TESTS) ../../.venv-cinder/bin/pytest -q -p no:cacheprovider -W ignore cinder_tests

bench: install
	$(PY) -m bench.run

# The fault soak (docs/reliability.md): stops by itself, writes faults/results/latest.md.
faults: install
	$(PY) -m faults.soak

clean:
	rm -rf $(VENV) .venv-cinder .pytest_cache .mypy_cache .ruff_cache *.egg-info
