# Two commands for a newcomer: `make run` (serve on 127.0.0.1:8080) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint install js bench bench-quick clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The JavaScript the tests drive: the AI SDK client, tsc, the React example (npm ci: the lockfiles).
JS_DIRS := tests/js examples/react-chat
js: $(foreach d,$(JS_DIRS),$(d)/node_modules/.package-lock.json)

%/node_modules/.package-lock.json: %/package-lock.json
	npm ci --prefix $* --no-audit --no-fund --loglevel=error

run: install  ## serve the built-in simulated model on 127.0.0.1:8080
	$(BIN)/gateway serve

lint: install
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

test: lint js  ## lint, then the whole test suite
	$(BIN)/pytest

bench: install  ## 500 SSE streams at 50 tokens/s, gateway vs a bare aiohttp baseline
	$(BIN)/python -m bench.sse_streams

bench-quick: install
	$(BIN)/python -m bench.sse_streams --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info $(foreach d,$(JS_DIRS),$(d)/node_modules)
