# Two commands do all set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench install clean

# torch first: setup.py compiles the C++ kernels (normkit._C) against it, once, here — never at import.
$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard src/normkit/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch numpy setuptools
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt -e ".[test,lab]"
	$(PY) -c "import normkit.cpu_backend as c; c.CpuBackend()" \
		|| echo "WARNING: normkit's C++ kernels are not built: the cpu backend is unavailable (normkit info)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/normkit lab

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/normkit bench --quick

clean:
	rm -rf $(VENV) normkit-report .pytest_cache
