# Two commands on a fresh clone: `make test` and `make demo`. Both create .venv and install the pins first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-requirements
DEMO_DATA := data/synthetic
export MPLBACKEND := Agg

.PHONY: setup test test-all demo clean-demo

setup: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m dataset.synthetic --out $(DEMO_DATA)

clean-demo:
	rm -rf $(DEMO_DATA) out/demo
