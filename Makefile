# Two entry points (see README): `make run` (the main job on the embedded default data set)
# and `make test`. Both create .venv and install the pinned versions on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench

# the install compiles the native bank search (fedpatch/_screen_kernel.c): a changed source reinstalls
$(STAMP): pyproject.toml constraints.txt fedpatch/_screen_kernel.c
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedpatch train --config configs/baseline/patchcore_offline.yaml --output-dir outputs/baseline

test: $(STAMP)
	$(PY) -m pytest -q


# Benchmarks side by side with anomalib (benchmarks/README.md). anomalib lives only in this
# separate environment, never in fedpatch's dependencies; constraints.txt pins what both share.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml constraints.txt fedpatch/_screen_kernel.c
	python3 -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet -c constraints.txt -e . "anomalib==2.7.*"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) -m benchmarks.coreset_bench
	$(BENCH_PY) -m benchmarks.run --suite main --anomalib-python $(BENCH_PY) --fedpatch-python $(BENCH_PY)
	$(BENCH_PY) -m benchmarks.paired_predict
	$(BENCH_PY) -m benchmarks.run --suite precision --anomalib-python $(BENCH_PY) --fedpatch-python $(BENCH_PY)
	$(BENCH_PY) -m benchmarks.run --suite scaling --anomalib-python $(BENCH_PY) --fedpatch-python $(BENCH_PY)
	$(BENCH_PY) -m benchmarks.fit_memory
