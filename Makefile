# The two commands a new user runs (as root, on Debian 12):
#   make demo   set up everything and PXE-boot a VM from Mobinux in a private network
#   make test   run the whole test suite (unit, fuzz, interop, end-to-end VMs)

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test deps lint typecheck unit clean

deps:
	scripts/install-deps.sh

demo: deps
	scripts/demo.sh

lint: deps
	$(VENV)/bin/ruff check src tests bench

typecheck: deps
	$(VENV)/bin/mypy

unit: deps
	$(VENV)/bin/pytest tests/unit tests/fuzz -q

test: deps
	scripts/fetch-guest-kernel.sh
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
