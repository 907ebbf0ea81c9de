# Two entry points on a fresh Debian 12 machine, as root:
#   make lab    run the whole appliance on embedded defaults
#   make test   lint, type-check and run every test tier that fits in CI
# Both install what they need (Debian packages, .venv, pip) and are quick no-ops once it is there.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Debian's own interpreter (the one the edge image carries): it is built with loadable SQLite extensions,
# which sqlite-vec needs; pyenv and some other builds are not.
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
SITE ?= examples/lab.yaml

# Build tools for llama-cpp-python (compiled from source), venv support, TLS roots; headless chromium for
# the edge chat page test; nspawn test hosts (systemd-container, mmdebstrap, a bridge, an SSH client);
# apt-ftparchive (apt-utils) indexes the offline bundle's apt repository.
APT_PACKAGES := build-essential cmake python3-venv python3-dev ca-certificates chromium chromium-driver \
	systemd-container mmdebstrap iproute2 openssh-client apt-utils \
	cryptsetup-bin fdisk dosfstools mtools bmap-tools cpio e2fsprogs zstd
# The boot tier only (`make test-slow`): qemu with OVMF (UEFI firmware) and swtpm (the laptop's TPM 2.0).
BOOT_APT_PACKAGES := qemu-system-x86 ovmf swtpm swtpm-tools
# pytest's markers for the tiers `make test` runs; `make test-slow` runs what does not fit CI's time.
TEST_TIERS ?= (unit or integration or hosts or image) and not slow
SLOW_TIERS ?= slow or boot
PYTEST_ARGS ?=
# Python trees to lint (bench/ once it exists).
PY_DIRS := appliance runtime edge_image stacks tests $(wildcard bench)

.PHONY: help lab lab-status lab-down test test-slow lint typecheck pytest venv clean

help:
	@echo "make lab        start the appliance on embedded defaults ($(SITE))"
	@echo "make lab-status health of every embedded service"
	@echo "make lab-down   stop everything the lab started"
	@echo "make test       ruff + mypy + pytest ($(TEST_TIERS))"
	@echo "make test-slow  the full edge image build and boot ($(SLOW_TIERS)); tens of minutes"

$(STAMPS)/apt: Makefile scripts/ensure-apt.sh
	@mkdir -p $(STAMPS)
	scripts/ensure-apt.sh $(APT_PACKAGES)
	@touch $@

$(STAMPS)/apt-boot: Makefile scripts/ensure-apt.sh
	@mkdir -p $(STAMPS)
	scripts/ensure-apt.sh $(BOOT_APT_PACKAGES)
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@echo "installing the project into $(VENV) (llama-cpp-python compiles once: several minutes on 2 cores)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[lab,dev,iac]'
	@touch $@

venv: $(STAMPS)/venv

lab: $(STAMPS)/venv
	$(BIN)/appliance lab up --site $(SITE)

lab-status: $(STAMPS)/venv
	$(BIN)/appliance lab status --site $(SITE)

lab-down: $(STAMPS)/venv
	$(BIN)/appliance lab down --site $(SITE)

lint: $(STAMPS)/venv
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)

typecheck: $(STAMPS)/venv
	$(BIN)/mypy appliance runtime edge_image stacks

pytest: $(STAMPS)/venv
	$(BIN)/pytest -m "$(TEST_TIERS)" $(PYTEST_ARGS)

test: lint typecheck pytest

# The full edge image build and its qemu boot: tens of minutes on 2 cores, so outside `make test`.
test-slow: $(STAMPS)/venv $(STAMPS)/apt-boot
	$(BIN)/pytest -m "$(SLOW_TIERS)" $(PYTEST_ARGS)

clean:
	rm -rf $(STAMPS) .pytest_cache .mypy_cache .ruff_cache
