# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench samples docs-results clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU wheel; a GPU user installs CUDA torch first (README).
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# zennit (reference LRP for the tests) without its torchvision requirement: PyPI's torchvision is a CUDA build
	# that does not import beside the CPU torch wheel, and zennit needs it only for torchvision's own models.
	$(PY) -m pip install -q --no-deps "zennit==0.5.1"
	# torchxrayvision (its DenseNet class, for the weight-mapping test) without torchvision, for the same reason:
	# its other requirements (scikit-image, pandas, requests, imageio, tqdm) come with the ones above.
	$(PY) -m pip install -q --no-deps "torchxrayvision==1.5.7"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cutremain_monai.demo

test: $(STAMP)
	$(PY) -m ruff check cutremain_monai tests benchmarks tools
	# the 15 slowest tests are printed, so the next change sees its cost
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# the docs' result tables, rewritten from the runs that produce them (runs the demo first; tools/docs_results.py)
docs-results: $(STAMP)
	$(PY) tools/docs_results.py

samples: $(STAMP)
	$(PY) -m cutremain_monai.cli samples -o dicom_samples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
