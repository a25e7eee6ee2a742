# Tollgate: `make run` starts the demo, `make test` runs the whole suite.
CARGO ?= cargo

.PHONY: run test check bench build release deps deps-run load clean-demo fuzz

## What `make test` needs (the build tools, redis-server, openssl, promtool), installed if missing.
deps:
	@scripts/ensure-deps.sh --test

## What building and the demo need (cmake, a C compiler, curl), installed if missing.
deps-run:
	@scripts/ensure-deps.sh --run

build: deps-run
	$(CARGO) build

release: deps-run
	$(CARGO) build --release

## The demo: an echo upstream plus the gateway on config/demo.toml, with curl commands.
run: deps-run
	$(CARGO) run --release -- demo

## The whole suite: unit, integration (real gateway, real upstream, real Redis) and doc tests.
test: deps
	$(CARGO) test

## Formatting and lints, as CI would want them.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## Criterion micro-benchmarks.
bench: deps-run
	$(CARGO) bench

## End-to-end load against a local gateway (needs wrk).
load: release
	scripts/load.sh

## Fuzzing: each cargo-fuzz target in fuzz/ for FUZZ_RUNS executions (needs a nightly toolchain).
FUZZ_RUNS ?= 10000000
fuzz:
	@cargo fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	FUZZ_RUNS=$(FUZZ_RUNS) scripts/fuzz.sh

## End to end, on 127.0.0.1 (docs/performance.md, "End to end"): the bare Pingora hop, Tollgate
## with more and more policy on, and nginx, one proxy thread each, in interleaved wrk rounds;
## prints the table and writes it into docs/performance.md. About 7 minutes after the build.
## Settings such as ROUNDS=5 or DURATION=5 pass through (see benches/e2e/run.sh).
.PHONY: bench-e2e bench-scale bench-h2
bench-e2e:
	@scripts/ensure-deps.sh --bench
	$(CARGO) build --release --bin tollgate --example bare_hop
	BENCH_COMMAND="make bench-e2e" benches/e2e/run.sh

## Scale (docs/performance.md, "Scale"): 100k tenants and 1M keys from the config file, the
## embedded store and Redis: start, memory, admin writes and reads, a second instance over Redis,
## reloads under load, keyed throughput. About 7 to 9 minutes; the 1M-key cases need 6 GiB of
## free memory and are skipped without it.
bench-scale:
	@scripts/ensure-deps.sh --bench
	$(CARGO) build --release --bin tollgate
	BENCH_COMMAND="make bench-scale" benches/e2e/scale.sh

## HTTP/2 (docs/performance.md, "HTTP/2"): the gateway's requests per second and CPU per request
## over h2c against HTTP/1.1, same config and upstream, with h2load. About 2 minutes after the build.
bench-h2:
	@scripts/ensure-deps.sh --bench
	$(CARGO) build --release --bin tollgate
	benches/e2e/h2.sh
