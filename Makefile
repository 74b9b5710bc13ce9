# chatterbox-rt: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

SETUP_INPUTS := pyproject.toml setup.py scripts/setup_env.sh tests/requirements-reference.txt

.PHONY: demo test setup setup-test clean

$(VENV)/.setup-base: $(SETUP_INPUTS)
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $@

$(VENV)/.setup-test: $(SETUP_INPUTS)
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV) --test
	touch $(VENV)/.setup-base $@

setup: $(VENV)/.setup-base
setup-test: $(VENV)/.setup-test

# Main job: speech tokens from every variant (dummy weights unless CKPT=dir is given).
demo: $(VENV)/.setup-base
	$(VENV)/bin/chatterbox-rt demo $(if $(CKPT),--ckpt $(CKPT),--dummy-weights) $(DEMO_ARGS)

test: $(VENV)/.setup-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
