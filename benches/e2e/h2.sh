#!/usr/bin/env bash
# `make bench-h2`: what one proxied request costs the gateway over HTTP/2 (h2c) against HTTP/1.1,
# same gateway, same config, same upstream.
#
# Everything runs on 127.0.0.1: one nginx process answering 26 bytes of JSON (the upstream of
# `make bench-e2e`), and Tollgate with one proxy thread and the "keyed" config (key
# authentication and a scope check, no limits, no access log). h2load drives both protocols
# with the same 64 connections for the same time:
#
#   h1      h2load --h1 -c64 -m1     HTTP/1.1 keep-alive, one request in flight per connection
#   h2c     h2load -c64 -m1          HTTP/2 with prior knowledge, one stream per connection
#   h2c-m8  h2load -c64 -m8          HTTP/2, eight concurrent streams per connection
#
# For ROUNDS rounds, each variant in turn (the order rotates) gets a WARMUP-second run and a
# measured DURATION-second one. The gateway's CPU time (utime + stime, from /proc/PID/stat) over
# the measured run, divided by the requests h2load completed, is its CPU cost per request. With
# two or more CPUs the gateway runs on CPU 0 and h2load and nginx on CPU 1 (taskset). The table
# (medians, min-max) is printed and kept in target/bench-h2/results.tsv; docs/performance.md
# ("HTTP/2") holds the run it reports. Everything this script starts, it stops (by PID).
#
# Environment: ROUNDS [3]  DURATION [8]  WARMUP [2]  PIN [auto]
# Needs a release build (`cargo build --release --bin tollgate`), h2load (nghttp2-client), nginx
# and curl; `make bench-h2` installs and builds what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/lib.sh
source benches/e2e/lib.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
PIN=${PIN:-auto}
CONNS=64
KEY=tg_live_bench_e2e_0000000000000000000000
KEY_HASH=487c084bf6ca4d97907acf63a58d40f869541d82c1a9f46f156bc29c09dbf323
URL_PATH=/api/items/42
TOLLGATE=${CARGO_TARGET_DIR:-target}/release/tollgate
OUT=target/bench-h2
VARIANTS="h1 h2c h2c-m8"

die() {
    echo "bench-h2: $*" >&2
    exit 1
}
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ && "$DURATION" =~ ^[1-9][0-9]*$ && "$WARMUP" =~ ^[0-9]+$ ]] ||
    die "ROUNDS, DURATION and WARMUP must be whole numbers (ROUNDS and DURATION at least 1)"
for tool in h2load nginx curl ss; do
    command -v "$tool" >/dev/null || die "$tool is not installed; run: scripts/ensure-deps.sh --bench"
done
[ -x "$TOLLGATE" ] || die "$TOLLGATE is missing; run: cargo build --release --bin tollgate"
NGINX=$(command -v nginx)

if [ "$PIN" = auto ]; then
    if [ "$(nproc)" -ge 2 ]; then PIN=1; else PIN=0; fi
fi
PROXY_PIN=()
CLIENT_PIN=()
if [ "$PIN" = 1 ]; then
    PROXY_PIN=(taskset -c 0)
    CLIENT_PIN=(taskset -c 1)
fi

WORK=$(mktemp -d /tmp/tollgate-bench-h2.XXXXXX)
mkdir -p "$WORK/nginx-tmp" "$OUT"
: >"$OUT/results.tsv"
PIDS=()
cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        ours "$pid" && kill -TERM "$pid" 2>/dev/null
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port UPSTREAM_PORT
free_port PORT
free_port ADMIN_PORT
render() {
    sed -e "s|@DIR@|$WORK|g" -e "s|@PORT@|$PORT|g" -e "s|@ADMIN_PORT@|$ADMIN_PORT|g" \
        -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@KEY@|$KEY|g" -e "s|@KEY_HASH@|$KEY_HASH|g" "$1" >"$2"
}
render benches/e2e/configs/upstream.nginx.conf "$WORK/upstream.nginx.conf"
"${CLIENT_PIN[@]}" "$NGINX" -p "$WORK" -c "$WORK/upstream.nginx.conf" -e "$WORK/upstream.error.log" \
    >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
render benches/e2e/configs/keyed.toml "$WORK/keyed.toml"
"${PROXY_PIN[@]}" "$TOLLGATE" run -c "$WORK/keyed.toml" >"$WORK/tollgate.log" 2>&1 &
GW=$!
PIDS+=("$GW")
for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -H "Authorization: Bearer $KEY" \
        "http://127.0.0.1:$PORT$URL_PATH" || true)
    [ "$code" = 200 ] && break
    kill -0 "$GW" 2>/dev/null || die "the gateway exited while starting: $(tail -5 "$WORK/tollgate.log")"
    sleep 0.1
done
[ "$code" = 200 ] || die "the gateway did not answer 200 within 15 s (last: $code)"
code=$(curl -s -o /dev/null -w '%{http_code}' --http2-prior-knowledge -H "Authorization: Bearer $KEY" \
    "http://127.0.0.1:$PORT$URL_PATH")
[ "$code" = 200 ] || die "h2c with prior knowledge answered $code, not 200"

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    local -a f
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

# One h2load run: prints "requests succeeded-2xx".
load() { # variant seconds
    local -a mode=()
    case $1 in
        h1) mode=(--h1 -m1) ;;
        h2c) mode=(-m1) ;;
        h2c-m8) mode=(-m8) ;;
    esac
    "${CLIENT_PIN[@]}" h2load "${mode[@]}" -c"$CONNS" -t1 -D"$2" -H "Authorization: Bearer $KEY" \
        "http://127.0.0.1:$PORT$URL_PATH" 2>&1 | awk '
        /^requests:/ { done = $6 }
        /^status codes:/ { ok = $3 }
        END { print done + 0, ok + 0 }'
}

echo "bench-h2: $ROUNDS rounds of ${DURATION}s per variant, $CONNS connections, one gateway thread"
set -- $VARIANTS
for round in $(seq 1 "$ROUNDS"); do
    for v in "$@"; do
        load "$v" "$WARMUP" >/dev/null
        c0=$(cpu_ticks "$GW")
        read -r done ok < <(load "$v" "$DURATION")
        c1=$(cpu_ticks "$GW")
        [ "$done" -gt 0 ] || die "$v: h2load completed no request"
        [ "$ok" = "$done" ] || die "$v: $ok of $done requests answered 2xx"
        us=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$done" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
        rps=$(awk -v n="$done" -v d="$DURATION" 'BEGIN { printf "%.0f", n / d }')
        printf '%s\t%s\t%s\t%s\n' "$round" "$v" "$rps" "$us" >>"$OUT/results.tsv"
        printf '  round %s  %-7s %8s req/s  %6s us CPU/request\n' "$round" "$v" "$rps" "$us"
    done
    # Rotate the order, so no variant always runs first.
    set -- "${@:2}" "$1"
done

echo
printf '| Variant | Requests/s (median, min-max) | Gateway CPU per request, µs (median, min-max) |\n|---|---|---|\n'
for v in $VARIANTS; do
    awk -F'\t' -v v="$v" '$2 == v { r[++n] = $3; c[n] = $4 }
        function med(a, n,   i, j, t) {
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        END {
            mr = med(r, n); lo_r = r[1]; hi_r = r[n]
            mc = med(c, n); lo_c = c[1]; hi_c = c[n]
            printf "| %s | %d (%d-%d) | %.1f (%.1f-%.1f) |\n", v, mr, lo_r, hi_r, mc, lo_c, hi_c
        }' "$OUT/results.tsv"
done
