# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create and reuse .venv: torch 2.13.0 (CPU build) first, then sts with its dev extras.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test pretrain-base clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/sts demo

test: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	$(PY) -m pytest

pretrain-base: $(STAMP)
	.venv/bin/sts pretrain-base

clean:
	rm -rf .venv runs
