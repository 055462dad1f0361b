# The two commands: `make demo` and `make test`. Each sets itself up on a machine that has
# only Python 3.11: a virtualenv in .venv, the pinned dependencies, migrations.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch lies here on some machines; pip prefers it to a multi-GB CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed

.PHONY: demo test install lint typecheck check-migrations pytest system-deps browser-deps clean bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(FIND_LINKS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m config.demo

# Debian packages the end-to-end tests drive for real: an OpenSSH server for provisioning
# and Chromium for the dashboard. Installed when missing and we are root.
system-deps:
	@bash scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy .

check-migrations: install
	DJANGO_SETTINGS_MODULE=config.settings.test $(BIN)/python manage.py makemigrations --check --dry-run

pytest: install system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test: install system-deps lint typecheck check-migrations pytest

bench: install
	$(BIN)/python -m benchmarks.heartbeat

clean:
	rm -rf $(VENV) var
