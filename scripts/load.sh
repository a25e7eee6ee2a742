#!/usr/bin/env bash
# End-to-end load: the echo upstream alone, then the same upstream through the gateway with a
# valid key (resolve, authenticate, rules, limits, metering all on). Uses the demo config, so
# stop `make run` first. Needs wrk (apt-get install wrk) and a release build (`make release`).
#
#   scripts/load.sh [duration-seconds] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
CONNS="${2:-32}"
BIN=target/release/tollgate
KEY=tg_live_u1UuytE2YMsGVuRQhPp9UyIEywPUAUFP   # the public demo key of config/demo.toml

command -v wrk >/dev/null || { echo "load.sh: wrk is not installed; run: sudo apt-get install -y wrk" >&2; exit 1; }
[ -x "$BIN" ] || { echo "load.sh: $BIN is missing; run: make release" >&2; exit 1; }

"$BIN" demo -c config/demo.toml >/tmp/tollgate-load.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:9090/healthz >/dev/null 2>&1 && break
    sleep 0.1
done

run() {
    local label="$1"; shift
    echo "== $label (${DURATION}s, $CONNS connections)"
    wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$@" | grep -E "Requests/sec|Latency|50%|99%|Non-2xx"
}

run "echo upstream alone" http://127.0.0.1:9000/v1/hello
run "through the gateway" -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/v1/hello
run "rejected (no key)" http://127.0.0.1:8080/v1/hello
echo "== done; the gateway log is in /tmp/tollgate-load.log"
