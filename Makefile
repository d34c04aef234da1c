# The README's commands. Each target installs what it needs first, so a
# fresh machine only needs `make run` or `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_CREDENTIALS := .dev-credentials
# command:debian-package pairs; the run needs xdelta3, the tests also promtool,
# rclone (a client the e2e tests drive) and tinyproxy (an outbound proxy).
RUN_DEPS := xdelta3:xdelta3
TEST_DEPS := $(RUN_DEPS) promtool:prometheus rclone:rclone tinyproxy:tinyproxy

.PHONY: run test bench system-deps test-system-deps venv clean

define install_missing
	@missing=""; for pair in $(1); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $$missing; \
	  else sudo apt-get update -q && sudo apt-get install -y -q $$missing; fi; \
	fi
endef

system-deps:
	$(call install_missing,$(RUN_DEPS))

test-system-deps:
	$(call install_missing,$(TEST_DEPS))

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $(STAMP)

venv: system-deps $(STAMP)

$(DEV_CREDENTIALS):
	@umask 077; { echo "DGP_ACCESS_KEY_ID=dev$$(openssl rand -hex 6)"; \
	  echo "DGP_SECRET_ACCESS_KEY=$$(openssl rand -hex 20)"; } > $(DEV_CREDENTIALS)

# Local development: filesystem backend in ./data on 127.0.0.1:9000 with
# per-checkout random credentials (kept in .dev-credentials, never in code).
run: venv $(DEV_CREDENTIALS)
	@set -a; source $(DEV_CREDENTIALS); set +a; \
	echo "dgproxy on http://$${DGP_LISTEN_ADDR:-127.0.0.1:9000}  data: $${DGP_DATA_DIR:-./data}"; \
	echo "  AWS_ACCESS_KEY_ID=$$DGP_ACCESS_KEY_ID"; \
	echo "  AWS_SECRET_ACCESS_KEY=$$DGP_SECRET_ACCESS_KEY"; \
	DGP_LISTEN_ADDR=$${DGP_LISTEN_ADDR:-127.0.0.1:9000} DGP_DATA_DIR=$${DGP_DATA_DIR:-./data} \
	  exec $(VENV)/bin/twistd -n --pidfile= dgproxy $${DGP_CONFIG:+--config $$DGP_CONFIG}

test: test-system-deps venv
	$(PY) tests/run.py $(TESTS)

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
