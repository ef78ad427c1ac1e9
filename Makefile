# One entry point for a new machine: `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= demo_out
# The CPU wheel of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# pytest-xdist workers for `make test`: much of the suite waits (Ray start-up, subprocesses, ffmpeg, sleeps),
# so two processes share 2 cores better than one. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
APT_PACKAGES := ffmpeg espeak-ng libespeak-ng1 libjemalloc2 chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint format system venv benchmarks clean

demo: $(VENV)/.installed
	$(BIN)/lipsync demo $(OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# Unit tests only: no Ray, no browser; minutes, not tens of minutes.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest tests/unit

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

benchmarks: $(VENV)/.installed
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# System packages (Debian): installed only when a tool is missing.
system:
	@missing=""; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	ldconfig -p | grep -q libespeak-ng.so || missing="$$missing libespeak-ng1"; \
	ldconfig -p | grep -q libjemalloc.so.2 || missing="$$missing libjemalloc2"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
