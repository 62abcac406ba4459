# The single entry point. `make test` and `make demo` create .venv from the lock when it is missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
# pip takes a local CPU wheel of this release when the machine has one (see README, "Development").
TORCH_VERSION := 2.13.0
PACKAGES := packages/tqai-core packages/tqai-torch packages/tqai-mlx packages/tqai-diffusers
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-gpu lint fmt bench bench-gpu lock readme report ci clean

setup: $(STAMP)

$(STAMP): requirements/lock.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"
	$(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(UV) pip install -q --python $(PY) -r requirements/lock.txt $(foreach p,$(PACKAGES),-e $(p)) -e tests/fixtures/tqai-plugin-example
	touch $@

demo: $(STAMP)
	$(VENV)/bin/tqai compare "Write a short poem about the sea." --model smollm2-135m --max-new-tokens 48

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	cd benchmarks && ../$(PY) bench_distortion.py && ../$(PY) bench_codec.py \
		&& ../$(PY) bench_pipeline.py && ../$(PY) bench_memory.py && ../$(PY) bench_fidelity.py && ../$(PY) bench_qjl.py
	$(PY) scripts/update_readme.py

# On a CUDA GPU: decode attention per layer-call and end-to-end decode (Llama-3-8B shape).
bench-gpu: $(STAMP)
	cd benchmarks && ../$(PY) bench_attention.py && ../$(PY) bench_generate.py
	$(PY) scripts/update_readme.py

readme: $(STAMP)
	$(PY) scripts/update_readme.py

# One self-contained HTML page (plots + tables) from benchmarks/results/*.json.
report: $(STAMP)
	$(PY) benchmarks/report.py --output build/report/index.html

lock: $(STAMP)
	$(UV) pip compile requirements/dev.in --python-version 3.11 --no-header --no-annotate \
		--no-emit-package torch $(if $(wildcard /opt/wheels),--find-links /opt/wheels) -o requirements/lock.body
	{ head -n 3 requirements/lock.txt; cat requirements/lock.body; } > requirements/lock.tmp
	mv requirements/lock.tmp requirements/lock.txt; rm -f requirements/lock.body

ci: lint test

clean:
	rm -rf $(VENV) dist build .pytest_cache .hypothesis
