# Two commands do all the set-up on a fresh CPU machine:
#   make demo   # create .venv, install the CPU stack, run `restem-ray demo` (2 iterations + control arm, local Ray)
#   make test   # same set-up, then the test suite (includes an end-to-end demo --quick)
.PHONY: setup demo quick test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/restem-ray demo $(ARGS)
quick: setup
	.venv/bin/restem-ray demo --quick $(ARGS)
# Two pytest-xdist workers: one end-to-end run leaves about a third of two cores idle while its processes
# start (tests/conftest.py keeps the tests that time the machine alone). The built-in base models that most
# end-to-end tests need are built first, on every core (cached: a no-op once built); built inside the tests,
# beside the other worker's runs, they took longer than the second worker saved on a fresh machine.
TEST_WORKERS ?= 2
test: setup
	.venv/bin/restem-ray build-tiny >/dev/null
	.venv/bin/restem-ray build-tiny --task code >/dev/null
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) $(ARGS)
