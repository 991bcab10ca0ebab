# Two entry points (see README): `make run` (the main job on the embedded default data set)
# and `make test`. Both create .venv and install the pinned versions on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedpatch train --config configs/baseline/patchcore_offline.yaml --output-dir outputs/baseline

test: $(STAMP)
	$(PY) -m pytest -q

