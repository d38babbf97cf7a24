# stylequeue — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# imagenet (default) needs torchvision's VGG19 weights (downloaded once, see README);
# `make demo WEIGHTS=random` runs on a machine that cannot download them.
WEIGHTS ?= imagenet

.PHONY: install test lint bench demo screenshots clean

install: $(VENV)/.installed

# Reinstall when the project's requirements change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check api worker shared tests bench deploy
	$(VENV)/bin/ruff format --check api worker shared tests bench deploy
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/engine.py
	$(PY) bench/gpu.py --quick
	$(PY) bench/service.py
	$(PY) bench/service_worker.py
	$(PY) bench/chaos.py --jobs 50 --kills 20
	$(PY) bench/fairness.py
	$(PY) bench/webhooks.py
	$(PY) bench/hostile.py
	$(PY) bench/fuzz.py --requests 10000

demo: install
	$(PY) deploy/demo.py --weights $(WEIGHTS)

# The web page's pictures for the README (docs/screenshots/*.png): a real api + worker stack in a
# temporary folder, driven by the system's Chromium (`apt-get install chromium`; nothing is downloaded).
screenshots: install
	$(PY) -m tests.web.screenshots --out docs/screenshots

clean:
	rm -rf $(VENV) demo-out .stylequeue .pytest_cache
