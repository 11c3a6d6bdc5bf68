# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both install curvlab first (keeping any torch already installed; see scripts/install.sh).
PYTHON ?= python3

.PHONY: install run test test-slow lint bench docs
install:
	PYTHON=$(PYTHON) bash scripts/install.sh

run: install
	$(PYTHON) -m curvlab.cli sweep --out runs/sweep --resume

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy curvlab
	$(PYTHON) -m pytest -q

docs: install
	$(PYTHON) -m mkdocs build --strict --site-dir site

test-slow: install
	$(PYTHON) -m pytest -q --slow -m slow

bench: install
	$(PYTHON) benchmarks/hvp.py
	$(PYTHON) benchmarks/features.py
	$(PYTHON) benchmarks/monitor.py
	$(PYTHON) benchmarks/real_models.py
	$(PYTHON) -m curvlab.cli bench hvp
	$(PYTHON) -m curvlab.cli bench eigs
	$(PYTHON) benchmarks/distributed.py
