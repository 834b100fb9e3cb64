# Every target bootstraps what it needs, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CERTS  := certs
PORT   ?= 7777

SCAN   := .venv-scan
SCAN_STAMP := $(SCAN)/.installed

.PHONY: install pki test test-all lint run-server run-cluster demo bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(CERTS)/MSG_SERVER.p12: | $(STAMP)
	$(BIN)/msg-pki demo --out $(CERTS)

# Creates the demo PKI once; `make pki FORCE=1` replaces it.
pki: $(STAMP)
ifdef FORCE
	$(BIN)/msg-pki demo --out $(CERTS) --force
else
	@if [ -e $(CERTS)/MSG_SERVER.p12 ]; then echo "$(CERTS)/ exists (make pki FORCE=1 to replace it)"; \
	else $(BIN)/msg-pki demo --out $(CERTS); fi
endif

# sslyze pins an older `cryptography` than the relay needs, so the TLS scanner gets a venv of its own.
$(SCAN_STAMP):
	test -x $(SCAN)/bin/python || $(PYTHON) -m venv $(SCAN)
	$(SCAN)/bin/python -m pip install --quiet 'sslyze>=6,<7'
	touch $(SCAN_STAMP)

# Everything, the crash-safety test and the TLS scan included, on two workers (the machine's two cores);
# test-all also fuzzes far longer.
test: $(STAMP) $(SCAN_STAMP)
	MSG_RELAY_SSLYZE=$(CURDIR)/$(SCAN)/bin/sslyze $(BIN)/python -m pytest -n 2

test-all: $(STAMP) $(SCAN_STAMP)
	MSG_RELAY_SSLYZE=$(CURDIR)/$(SCAN)/bin/sslyze HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -n 2

# Static checks (ruff, mypy); not part of `make test`, so a new checker release cannot turn CI red.
lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check pki protocol server client scripts tests msg_server.py msg_client.py
	$(BIN)/mypy

run-server: $(STAMP) $(CERTS)/MSG_SERVER.p12
	$(BIN)/msg-server --p12 $(CERTS)/MSG_SERVER.p12 --crl $(CERTS)/ca/crl.pem --users-dir $(CERTS) --port $(PORT)

# Two nodes (7777, 7778) on one PostgreSQL database: PG_DSN=postgresql://USER@HOST:PORT/DB (default: local msg_relay).
run-cluster: $(STAMP) $(CERTS)/MSG_SERVER.p12
	$(BIN)/python scripts/cluster.py

demo: run-server

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(SCAN) *.egg-info .pytest_cache .hypothesis build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
