# The two commands that set up a fresh machine (see README):
#   make demo   install, then train the example MLP job on local storage (CPU)
#   make test   install with test extras, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
RUN ?= runs/mlp
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/activate:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "cluster-trainer needs Python 3.11, this is " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The extras each command installs; k8s/Dockerfile installs DEMO_EXTRAS too (a test checks).
DEMO_EXTRAS := plot
# bench: tests/test_bench.py runs every benchmark at its smallest size, the multi-worker one with tf-keras.
TEST_EXTRAS := test,plot,bench

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -e '.[$(DEMO_EXTRAS)]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -e '.[$(TEST_EXTRAS)]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/cluster-trainer run jobs/mlp.py --storage $(RUN)
	$(BIN)/cluster-trainer status $(RUN)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=30

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
