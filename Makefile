# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create and reuse .venv: torch 2.13.0 (CPU build) first, then sts with its dev extras.
PY := .venv/bin/python
STAMP := .venv/.installed
OLDEST := .venv-oldest/.installed

.PHONY: demo test test-oldest pretrain-base clean

# $(1): the virtual environment's folder; $(2): more pip arguments for sts and its dev extras.
define make_venv
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -e ".[dev]" $(2)
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call make_venv,.venv,)

$(OLDEST): pyproject.toml oldest-supported.txt
	$(call make_venv,.venv-oldest,ms-swift -c oldest-supported.txt)

demo: $(STAMP)
	.venv/bin/sts demo

test: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	$(PY) -m pytest

# The suite against the oldest supported transformers, trl, peft and accelerate, with ms-swift (CI runs it too).
test-oldest: $(OLDEST)
	.venv-oldest/bin/python -m pytest

pretrain-base: $(STAMP)
	.venv/bin/sts pretrain-base
	.venv/bin/sts pretrain-base --family llava-next --records 6000 --language-steps 500

clean:
	rm -rf .venv .venv-oldest runs
