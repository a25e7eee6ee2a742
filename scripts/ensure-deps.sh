#!/usr/bin/env bash
# Installs what Tollgate's build and tests need, when it is missing:
#   cmake        - Pingora's zlib-ng build
#   redis-server - the Redis store's tests start their own server on a free port
#   curl, openssl - the TLS listener test makes a certificate and calls it over HTTPS
#   prometheus   - its `promtool check metrics` validates the /metrics output in the tests
# As root it installs with apt-get; otherwise it prints the command to run and exits 1.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v cc >/dev/null 2>&1 || need+=(build-essential)

if ! command -v cargo >/dev/null 2>&1; then
    echo "ensure-deps: cargo is not installed. Install Rust from https://rustup.rs, then run this again." >&2
    exit 1
fi

if [ ${#need[@]} -eq 0 ]; then
    echo "ensure-deps: all build and test dependencies are present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-deps: missing: ${need[*]}" >&2
    echo "ensure-deps: install them with: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-deps: missing: ${need[*]}, and apt-get is not available; install them with your package manager" >&2
    exit 1
fi

echo "ensure-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "ensure-deps: installed ${need[*]}"
