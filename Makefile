# The README's two commands: `make serve` and `make test`. Each bootstraps .venv idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test serve clean promtool redis-server

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first: a local CPU wheel (any other torch downloads a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# promtool (Debian's prometheus package) for the monitoring tests; the machines run as root.
promtool:
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

# redis-server (Debian's redis-server package) for the stored-Responses tests against Redis; tests start their own.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)

test: venv promtool redis-server
	$(PY) -m pytest -q tests

# The OpenAI API on 127.0.0.1:8000 serving the bundled demo model (1 replica x 2 EP ranks, CPU). Ctrl-C stops it.
serve: venv
	$(VENV)/bin/epserve serve

clean:
	rm -rf $(VENV) .cache
