# chatterbox-rt: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
DEMO_TEXT ?= Chatterbox-rt turns text into speech, end to end, on this machine.
# CPU threads for torch; 0 lets torch choose (all cores). On a machine shared with other busy
# processes, THREADS=1 avoids oversubscription (measured ~10x faster there than 2 threads).
THREADS ?= 0
PYTEST_ARGS ?=

SETUP_INPUTS := pyproject.toml setup.py scripts/setup_env.sh tests/requirements-reference.txt \
	tests/oracle/install.py tests/oracle/chatterbox-5de7a54.tar.gz

.PHONY: demo test test-all setup setup-test gpu-check clean

$(VENV)/.setup-base: $(SETUP_INPUTS)
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $@

$(VENV)/.setup-test: $(SETUP_INPUTS)
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV) --test
	touch $(VENV)/.setup-base $@

setup: $(VENV)/.setup-base
setup-test: $(VENV)/.setup-test

# Main job: speech tokens from every variant, then text -> demo.wav end to end (dummy weights,
# i.e. noise, unless CKPT=dir is given; dummy synthesis uses Nano, the quickest on a CPU).
demo: $(VENV)/.setup-base
	$(VENV)/bin/chatterbox-rt demo $(if $(CKPT),--ckpt $(CKPT),--dummy-weights) --threads $(THREADS) $(DEMO_ARGS)
	@$(if $(CKPT),,echo "make demo: no CKPT=dir given, so demo.wav comes from RANDOM weights: it is noise, not speech")
	$(VENV)/bin/chatterbox-rt synth "$(DEMO_TEXT)" -o demo.wav --seed 0 --threads $(THREADS) \
		$(if $(CKPT),--ckpt $(CKPT),--dummy-weights --variant nano)

# `make test` (CI's job) leaves out the tests marked `slow`: full-size models where a reduced one
# covers the same code, the 200-request load and the Triton-interpreter HiFT. `make test-all` runs
# every test (about 1.5x as long); run it before a release or after touching what those cover.
test: $(VENV)/.setup-test
	$(PY) -m pytest -q --durations=40 -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.setup-test
	$(PY) -m pytest -q --durations=40 $(PYTEST_ARGS)

# On a machine with a CUDA GPU: build the CUDA extension, GPU tests, kernel and end-to-end benchmarks,
# logged to $(OUT)/gpu_check.log (scripts/gpu_check.sh documents the steps; WHEELHOUSE=dir for offline wheels).
gpu-check:
	$(if $(OUT),,$(error make gpu-check needs OUT=dir, e.g. make gpu-check OUT=gpu_check_out))
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo.wav
