PYTHON ?= python3
# torch is installed on its own first: on the CI machines `torch==2.13.0` is a CPU wheel on disk,
# and a later `pip install -e .` then finds `torch>=2.13` already satisfied.
STAMP := .venv-stamp

.PHONY: install demo test lint
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m unitsface demo

lint: install
	$(PYTHON) -m ruff check unitsface tests bench

test: install
	bash scripts/install-browser.sh
	$(PYTHON) -m ruff check unitsface tests bench
	$(PYTHON) -m pytest -x -q --timeout=600 tests
