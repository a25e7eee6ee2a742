#!/usr/bin/env bash
# Installs what Tollgate needs, when it is missing, and prints nothing when it is all there.
#
#   scripts/ensure-deps.sh --run    what `make run` (build and demo) needs
#   scripts/ensure-deps.sh --test   what `make test` needs: the above and the test tools (default)
#   scripts/ensure-deps.sh --bench  what `make bench-e2e` and `make bench-scale` need
#
# Build and demo (--run):
#   cmake         - Pingora's zlib-ng build
#   cc            - C code in the dependencies (zlib-ng, SQLite); from build-essential
#   curl          - the demo prints curl commands to try the gateway with
# Tests (--test) add:
#   redis-server  - the Redis store's tests start their own server on a free port
#   openssl       - the TLS listener test makes a certificate (and calls it with curl)
#   prometheus    - its `promtool check metrics` validates the /metrics output
# End-to-end benchmarks (--bench) add, to the build tools and curl:
#   wrk           - the load generator
#   h2load        - the HTTP/2 load generator of `make bench-h2` (nghttp2-client)
#   nginx         - the upstream, and the reference proxy (nginx-light has map and limit_req)
#   redis-server  - the Redis store variant
#   perf          - CPU profiles of the gateway and of the bare Pingora hop (linux-perf)
#   taskset       - pins the proxy and wrk to their own cores (util-linux, normally present)
#   python3       - generates the scale bench's tenants and keys, and writes the reports
# None of them needs a nightly toolchain or cargo-fuzz: only `make fuzz` does, and it installs them.
#
# As root it installs with apt-get; otherwise it prints the command to run and exits 1.
set -euo pipefail

usage="usage: scripts/ensure-deps.sh [--run | --test | --bench]"
mode=test
case "${1:-}" in
    "" | --test) mode=test ;;
    --run) mode=run ;;
    --bench) mode=bench ;;
    -h | --help)
        echo "$usage"
        exit 0
        ;;
    *)
        echo "ensure-deps: unknown option \`$1\`; $usage" >&2
        exit 2
        ;;
esac

# The make target named in messages.
target=$mode
if [ "$mode" = bench ]; then
    target="bench-e2e\` or \`make bench-scale"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "ensure-deps: cargo is not installed. Install Rust from https://rustup.rs, then run this again." >&2
    exit 1
fi

# Each entry is "command:package".
deps=(cmake:cmake cc:build-essential curl:curl)
if [ "$mode" = test ]; then
    deps+=(redis-server:redis-server openssl:openssl promtool:prometheus)
fi
if [ "$mode" = bench ]; then
    deps+=(wrk:wrk h2load:nghttp2-client nginx:nginx-light redis-server:redis-server perf:linux-perf taskset:util-linux python3:python3)
fi

need=()
for dep in "${deps[@]}"; do
    command -v "${dep%%:*}" >/dev/null 2>&1 || need+=("${dep#*:}")
done

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-deps: missing for \`make $target\`: ${need[*]}" >&2
    echo "ensure-deps: install them with: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-deps: missing for \`make $target\`: ${need[*]}, and apt-get is not available; install them with your package manager" >&2
    exit 1
fi

echo "ensure-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "ensure-deps: installed ${need[*]}"
