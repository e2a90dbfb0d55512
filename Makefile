# make demo: set up .venv, run the whole pipeline on the quick preset (digits, local Ray, MLflow in mlflow.db).
# make test: set up .venv and run ruff and the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) pipelines/full.py --config quick

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# -X faulthandler: a crash prints every thread's stack, even after pytest has finished;
# --durations: the slowest tests, where the suite's time goes (it must stay under 35 minutes on 2 cores)
test: lint
	$(PY) -X faulthandler -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs *.egg-info
