# stylequeue — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# imagenet (default) needs torchvision's VGG19 weights (downloaded once, see README);
# `make demo WEIGHTS=random` runs on a machine that cannot download them.
WEIGHTS ?= imagenet

.PHONY: install test lint bench demo screenshots clean images base-image standins wheels compose-cpu deploy-test

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

# --- containers (deploy/README.md). No registry or network is needed inside a build: every package
# comes from a wheelhouse that `pip download` fills on this host (its own pip configuration).
IMAGES ?= api worker-cpu worker-gpu

# The API image, the CPU worker and the GPU worker (BASE_IMAGE=..., WEIGHTS_FILE=vgg19.pth to bake
# weights in, TORCH_CPU_SPEC / TORCH_CUDA_SPEC to pick torch builds). Host python3 >= 3.11 only.
images:
	$(PYTHON) deploy/images.py build $(IMAGES)

# Where no registry is reachable: a Python base image from debootstrap + `docker import`.
base-image:
	$(PYTHON) deploy/images.py base-image

# Where no registry is reachable: PostgreSQL, Redis, S3 (moto) and Flower from Debian's packages.
standins:
	$(PYTHON) deploy/images.py standins

# The wheelhouse alone (.docker-build/wheels/), for the base image's Python.
wheels:
	$(PYTHON) deploy/images.py wheels

# deploy/compose.cpu.yaml: compose.yaml with CPU workers and no GPU reservation.
compose-cpu: install
	$(PY) deploy/compose_cpu.py

# The compose stack for real (deploy/smoke.py): images, up, a batch, a killed worker, scale to 3, down -v.
deploy-test: install
	$(PY) deploy/smoke.py

clean:
	rm -rf $(VENV) demo-out .stylequeue .pytest_cache
