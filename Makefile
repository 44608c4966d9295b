# Set-up is two commands: `make demo` and `make test`; each creates the virtual
# environment first when it is missing (it is a prerequisite, not a separate step).
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# Each dvc.yaml stage runs `transfgu <stage>`: put the venv first on PATH.
RUN := PATH="$(BIN):$$PATH"

SETTING ?= demo
DATA_ROOT ?=
SET ?=

.PHONY: install demo test test-fast bench-cam bench-features bench-cam-precision bench-loader bench-stages reproduce report clean help

help:
	@echo "make demo       run the whole pipeline on the synthetic demo (dvc repro)"
	@echo "make test       run the test suite"
	@echo "make report     static HTML report -> cache/report/index.html"
	@echo "make bench-cam  batched vs per-concept CAM timing (prints cam_speedup=...)"
	@echo "make bench-stages  each per-image stage against its bare compute (prints <stage>_efficiency=...)"
	@echo "make reproduce SETTING=<name> DATA_ROOT=<path> [SET='key=value ...']"

# faiss build: gpu where an NVIDIA driver answers, else cpu (override: make install FAISS=cpu).
# The other one is uninstalled first: both own the same faiss/ package.
FAISS ?= $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu-cu12)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet -y $(OTHER_FAISS) 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -e '.[$(FAISS),test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(RUN) dvc repro
	$(RUN) transfgu metrics
	@echo "all metrics: dvc metrics show; pictures: cache/report/index.html"

test: $(STAMP)
	$(RUN) python -m pytest -q -ra

test-fast: $(STAMP)
	$(RUN) python -m pytest -q -ra -m "not slow"

report: $(STAMP)
	$(RUN) dvc repro report
	@echo "report: cache/report/index.html"

bench-cam: $(STAMP)
	$(RUN) python benchmarks/bench_cam.py

bench-features: $(STAMP)
	$(RUN) python benchmarks/bench_features_memory.py

bench-cam-precision: $(STAMP)
	$(RUN) python benchmarks/bench_cam_precision.py --images 30

bench-loader: $(STAMP)
	$(RUN) python benchmarks/bench_loader.py

bench-stages: $(STAMP)
	$(RUN) python benchmarks/bench_stages.py

# One named setting through DVC: writes its params.yaml, then `dvc exp run` (SET holds
# extra overrides, `dvc exp show` compares the runs).
reproduce: $(STAMP)
	$(RUN) transfgu settings use $(SETTING) $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)")
	$(RUN) dvc exp run $(foreach s,$(SET),--set-param '$(s)')
	$(RUN) transfgu metrics

clean:
	rm -rf cache data/synthetic
