# freezeframe build entry points (see shared DESIGN.md, "Dependencies").
SHELL  := /bin/bash
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv browser test demo bench soak clean

venv: $(STAMP)

# Re-runs only when pyproject.toml or the lock file changes.
$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/lock.txt
	$(PIP) install --no-deps -e '.[test]'
	@touch $@

# Debian's Chromium for the Playwright browser tests (never `playwright install`).
# Outside CI a failure only prints a line; with CI set it fails the build.
browser:
	@if [ -x /usr/bin/chromium ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: installing Debian chromium"; \
	  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then \
	    echo "browser: could not install chromium; browser tests will be skipped"; \
	    if [ -n "$${CI:-}" ]; then exit 1; fi; \
	  fi; \
	else \
	  echo "browser: /usr/bin/chromium missing and cannot apt-get install it (not root or no apt-get); browser tests will be skipped"; \
	fi

test: venv browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/freezeframe demo

# The overhead of watching (freezeframe and its peers), the recorder's cost per step against the
# tensor count, the report's cost at scale, and the memory/disk a watched large model costs; each
# writes its tables into docs/benchmarks.md (benchmarks/README.md). Not part of `make test`.
bench: venv
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/report_scaling.py
	$(PY) benchmarks/cost_scale.py

soak: venv
	HF_HUB_OFFLINE=1 FREEZEFRAME_SOAK=1 $(PY) -m pytest tests/soak -q -s

clean:
	rm -rf build dist .pytest_cache .hypothesis .ruff_cache src/*.egg-info *.egg-info
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
	  \( -name __pycache__ -type d -o -name '*.pyc' -type f \) -print0 | xargs -0 -r rm -rf
