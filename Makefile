# One entry point for every check. CI runs `make test` (see .ci/run).
SHELL := /bin/bash
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: setup build demo test unit e2e lint bench bench-scale soak chart-check clean-e2e

setup:
	bash e2e/setup.sh

build: setup
	$(CARGO) build --workspace --bins

## The local demo: nodes in network namespaces with real containerd and a local upstream.
demo: setup
	$(CARGO) build --release -p mirrorlet -p mirrorlet-e2e --bins
	MIRRORLET_BIN=$(CURDIR)/target/release/mirrorlet ./target/release/demo

## Everything: lints, unit and integration tests, end-to-end scenarios (needs root).
test: build lint
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --profile ci --no-fail-fast
else
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=1
endif

## Tiers 1 and 2 (unit tests, in-process servers and DHTs): no root, no containerd, no
## network namespaces. Everything that needs real parts is in mirrorlet-e2e.
unit:
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --exclude mirrorlet-e2e
else
	$(CARGO) test --workspace --exclude mirrorlet-e2e
endif

e2e: build
	$(CARGO) test -p mirrorlet-e2e -- --test-threads=1

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 charts/mirrorlet/ci/values-table.py --check
	shellcheck e2e/setup.sh e2e/kind/*.sh e2e/bench/*.sh
	cargo deny --offline check licenses bans sources

bench: setup
	bash e2e/bench/run.sh

## The DHT at 10 to 100 nodes in one process, every node announcing at once.
bench-scale: setup
	bash e2e/bench/scale.sh

## One agent under mixed well-behaved, slow, stalled and broken clients for 10 minutes.
soak: setup
	bash e2e/bench/soak.sh

## Checks the Helm chart offline with the workspace's chart-check tool (needs ../shared).
chart-check:
	$(CARGO) build --release -p mirrorlet
	../shared/tools/chart-check/run charts/mirrorlet/ci/check-variants.txt
	/tmp/chart-check/venv/bin/python charts/mirrorlet/ci/check-refusals.py /tmp/chart-check/helmrender

## Removes clusters left behind by a killed test run.
clean-e2e:
	$(CARGO) run -q -p mirrorlet-e2e --bin e2e-sweep
