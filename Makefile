# Tollgate: `make run` starts the demo, `make test` runs the whole suite.
CARGO ?= cargo

.PHONY: run test check bench build release deps load clean-demo

deps:
	@scripts/ensure-deps.sh

build: deps
	$(CARGO) build

release: deps
	$(CARGO) build --release

## The demo: an echo upstream plus the gateway on config/demo.toml, with curl commands.
run: deps
	$(CARGO) run --release -- demo

## The whole suite: unit, integration (real gateway, real upstream, real Redis) and doc tests.
test: deps
	$(CARGO) test

## Formatting and lints, as CI would want them.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## Criterion micro-benchmarks.
bench: deps
	$(CARGO) bench

## End-to-end load against a local gateway (needs wrk).
load: release
	scripts/load.sh
