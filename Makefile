# flowtap: `make run` sets everything up and starts the sensor; `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
BPF_OUT := src/flowtap/bpf
BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_OBJ := $(patsubst bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(BPF_SRC))
ARCH := $(shell uname -m | sed 's/x86_64/x86/;s/aarch64/arm64/')
CLANG ?= clang
BPFTOOL ?= $(shell command -v bpftool || echo /usr/sbin/bpftool)
FLOWTAP_ARGS ?=
# make test-kernels: which kernels (5.10 6.1 6.12 host), guests at once, seconds per guest.
KERNELS ?= 5.10 6.1 6.12
KERNEL_JOBS ?= 2
KERNEL_TIMEOUT ?= 720

.PHONY: all setup deps venv bpf test-bpf run test test-kernels lint clean

all: setup

setup: deps venv bpf

# Debian packages; skipped when a previous run installed them (stamp keyed on the list).
deps: $(BUILD)/.deps-stamp
$(BUILD)/.deps-stamp: scripts/debian-packages.txt
	@mkdir -p $(BUILD)
	scripts/install-debian-packages.sh scripts/debian-packages.txt
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml requirements-dev.txt | $(BUILD)/.deps-stamp
	/usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
	@touch $@

$(BUILD)/vmlinux.h: | $(BUILD)/.deps-stamp
	@mkdir -p $(BUILD)
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

bpf: $(BPF_OBJ)
$(BPF_OUT)/%.bpf.o: bpf/%.bpf.c $(wildcard bpf/*.h) $(BUILD)/vmlinux.h
	@mkdir -p $(BPF_OUT)
	$(CLANG) -g -O2 -Wall -Werror -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) \
		-I$(BUILD) -Ibpf -c $< -o $@.tmp
	mv $@.tmp $@

# Test-only BPF objects (loader tests); never shipped in the package.
TEST_BPF_OBJ := $(patsubst tests/bpf/%.bpf.c,$(BUILD)/tests/%.bpf.o,$(wildcard tests/bpf/*.bpf.c))
test-bpf: $(TEST_BPF_OBJ)
$(BUILD)/tests/%.bpf.o: tests/bpf/%.bpf.c $(BUILD)/vmlinux.h
	@mkdir -p $(BUILD)/tests
	$(CLANG) -g -O2 -Wall -Werror -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) \
		-I$(BUILD) -c $< -o $@.tmp
	mv $@.tmp $@

run: setup
	$(VENV)/bin/flowtap run $(FLOWTAP_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: setup test-bpf lint
	$(VENV)/bin/pytest -ra tests

# The e2e tests marked `kernels`, and `flowtap check`, in stock Debian kernels under qemu
# (tests/kernels/README.md).
test-kernels: setup
	$(PY) tests/kernels/matrix.py --jobs $(KERNEL_JOBS) --timeout $(KERNEL_TIMEOUT) $(KERNELS)

clean:
	rm -rf $(BUILD) $(BPF_OUT)/*.bpf.o
