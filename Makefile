# The README's two commands: `make demo` (the main job) and `make test` (all tests).
# Both run `make setup` first, which installs only what is missing:
# Debian packages, the .venv, the static guest agent, the compiled project, the kernelspec,
# the default guest image (cached under ~/.cache/supermachine-kernel, keyed by its recipe)
# and the kernel's warm snapshot (cached beside it).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
TARGET_TRIPLE := x86_64-unknown-linux-gnu
AGENT_BUILT := core/target/$(TARGET_TRIPLE)/release/supermachine-agent
AGENT := supermachine_kernel/guest/supermachine-agent
RUST_SOURCES := $(shell find core -path core/target -prune -o \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -print)
PY_SOURCES := $(shell find supermachine_kernel kernelspecs -type f -not -name '*.so' -not -path '*/__pycache__/*' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup host demo test test-types test-rust test-python image warm clean fuzz fuzz-tools

setup: host $(STAMPS)/build $(STAMPS)/kernelspec image warm

host:
	@tools/setup-host.sh

$(STAMPS)/venv: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade "pip>=23" "maturin>=1.5,<2"
	@mkdir -p $(STAMPS) && touch $@

$(AGENT_BUILT): $(RUST_SOURCES)
	@echo "setup: building the static guest agent" >&2
	cd core && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
		-p supermachine-agent --target $(TARGET_TRIPLE)
	@touch $@

$(AGENT): $(AGENT_BUILT)
	@mkdir -p $(dir $@) && cp $< $@

# The preload that lets QEMU restore a host-wide snapshot a user may read but not write
# (core/ro-ram/ro_ram.c; the runtime uses it only for such a restore).
RO_RAM := supermachine_kernel/ro_ram.so
$(RO_RAM): core/ro-ram/ro_ram.c
	cc -shared -fPIC -O2 -Wall -Wextra -o $@ $< -ldl

# The JupyterLab extension (labextension/): npm packages from package-lock.json, TypeScript,
# then the Jupyter builder (from the jupyterlab pip package) writes the prebuilt extension into
# labextension/wheel-data/data/share/jupyter/labextensions/, which maturin ships in the wheel
# ([tool.maturin] data), so `maturin develop` installs it into the venv. Rebuilt only when its
# sources change.
LAB := labextension
LAB_SOURCES := $(shell find $(LAB)/src $(LAB)/style -type f 2>/dev/null) $(LAB)/package.json \
	$(LAB)/tsconfig.json
$(LAB)/node_modules/.installed: $(LAB)/package.json $(LAB)/package-lock.json
	@echo "setup: installing the extension's npm packages" >&2
	cd $(LAB) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(STAMPS)/labextension: $(STAMPS)/venv $(LAB)/node_modules/.installed $(LAB_SOURCES)
	@echo "setup: building the JupyterLab extension" >&2
	@$(PY) -m pip install -q "jupyterlab>=4.2,<5"
	cd $(LAB) && rm -rf lib wheel-data && node_modules/.bin/tsc && \
		PATH=$(abspath $(VENV))/bin:$$PATH jupyter-builder build .
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/build: $(STAMPS)/venv $(AGENT) $(RO_RAM) $(RUST_SOURCES) pyproject.toml $(STAMPS)/labextension
	@echo "setup: building supermachine_kernel._core into $(VENV)" >&2
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
		$(VENV)/bin/maturin develop -q --release --extras test
	@touch $@

$(STAMPS)/kernelspec: $(STAMPS)/build $(PY_SOURCES)
	$(PY) -m supermachine_kernel install --sys-prefix
	@touch $@

image: $(STAMPS)/build
	@$(VENV)/bin/supermachine-kernel image build default

# Bakes the kernel's warm snapshot (Python started, numpy/pandas/matplotlib imported) once,
# so the first notebook start restores it instead of waiting for a bake. Cached; fast on a hit.
warm: image $(STAMPS)/kernelspec
	@$(VENV)/bin/supermachine-kernel prepare

demo: setup
	$(PY) -m supermachine_kernel.cli.demo

test-rust: setup
	cd core && cargo test -q --workspace

# configurable-http-proxy for tests/hub (a real JupyterHub), from npm, kept under the venv.
HUB_PROXY := $(VENV)/hub-proxy/node_modules/.bin/configurable-http-proxy
$(HUB_PROXY):
	npm install --no-audit --no-fund --loglevel=error --prefix $(VENV)/hub-proxy configurable-http-proxy@4

# Fuzzing (issue 16): the cargo-fuzz targets in core/fuzz and the atheris harness of the
# guest-frame parser (tests/fuzz; atheris is a test extra). cargo-fuzz is installed once per
# machine (cargo's bin directory); tools/fuzz.py picks the toolchain and reports runs, coverage
# and findings. `make fuzz` runs every target FUZZ_SECONDS; `make test` runs a short smoke of
# each (tests/security/test_fuzz_smoke.py). FUZZ_SANITIZER=none drops AddressSanitizer from the
# cargo-fuzz builds (5-9x more runs an hour for tcp_channels and agent_control; for long runs).
FUZZ_SECONDS ?= 60
FUZZ_SANITIZER ?= address
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ := $(or $(CARGO_HOME),$(HOME)/.cargo)/bin/cargo-fuzz
$(CARGO_FUZZ):
	@echo "setup: installing cargo-fuzz $(CARGO_FUZZ_VERSION)" >&2
	cargo install -q cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked

fuzz-tools: $(CARGO_FUZZ) $(STAMPS)/build

fuzz: fuzz-tools
	$(PY) tools/fuzz.py --seconds $(FUZZ_SECONDS) --sanitizer $(FUZZ_SANITIZER)

test-python: setup $(HUB_PROXY) fuzz-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# mypy over the package (its settings: [tool.mypy] in pyproject.toml), then mypy.stubtest: the
# hand-written _core.pyi against the compiled module. Seconds with mypy's cache (.mypy_cache).
test-types: $(STAMPS)/build
	$(PY) -m mypy
	$(PY) -m mypy.stubtest supermachine_kernel._core

test: test-types test-rust test-python

clean:
	rm -rf $(VENV) core/target $(AGENT) $(LAB)/node_modules $(LAB)/lib $(LAB)/wheel-data
