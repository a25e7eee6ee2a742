#!/usr/bin/env bash
# Asynchronous jobs end to end (docs/performance.md, "Jobs"): how fast a release gateway accepts
# jobs (POST answered 202, one store write each) and how fast its workers drain them against a
# trivial nginx upstream, on SQLite and on Redis. Loopback only, bounded load.
#
#   benches/e2e/jobs.sh [DURATION_SECONDS]    (needs a release build, nginx, redis-server, wrk)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/e2e/lib.sh
. benches/e2e/lib.sh
DURATION=${1:-5}
BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
[ -x "$BIN" ] || { echo "build the release binary first: cargo build --release" >&2; exit 1; }
DIR=$(mktemp -d /tmp/tollgate-bench-jobs.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do ours "$p" && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
KEY=tg_live_benchJOBSxxxxxxxxxxxxxxxxxxxxxxxx
KEY_HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)

free_port UPSTREAM_PORT
mkdir -p "$DIR/nginx-tmp"
sed -e "s|@DIR@|$DIR|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" benches/e2e/configs/upstream.nginx.conf >"$DIR/nginx.conf"
nginx -c "$DIR/nginx.conf" -p "$DIR" & PIDS+=($!)
free_port REDIS_PORT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >/dev/null & PIDS+=($!)
sleep 0.5

cat >"$DIR/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"rows":1000}'
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.headers["Content-Type"] = "application/json"
LUA

run() {
    local name=$1 store=$2 port admin start end total done_
    free_port port
    free_port admin
    cat >"$DIR/$name.toml" <<TOML
[server]
listen = ["127.0.0.1:$port"]
admin_listen = "127.0.0.1:$admin"
threads = 1
upgrade_sock = "$DIR/$name.sock"
pid_file = "$DIR/$name.pid"
[store]
$store
[log]
access_log = false
level = "warn"
[jobs]
workers = 8
poll_interval = "100ms"
max_open_per_tenant = 1000000
[upstreams.api]
servers = ["127.0.0.1:$UPSTREAM_PORT"]
[tiers.open]
upstream = "api"
[[tenants]]
id = "acme"
tier = "open"
[[tenants.keys]]
id = "acme-bench"
hash = "sha256:$KEY_HASH"
scopes = ["read"]
[[rule]]
name = "generate"
match = { path_prefix = "/" }
mode = "async"
TOML
    "$BIN" run -c "$DIR/$name.toml" 2>"$DIR/$name.log" & local gw=$!
    PIDS+=("$gw")
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
    echo "== $name: submissions (wrk -t1 -c16 -d${DURATION}s, POST answered 202)"
    start=$(date +%s.%N)
    wrk -t1 -c16 -d"${DURATION}s" -s "$DIR/post.lua" "http://127.0.0.1:$port/gen" | grep -E "Requests/sec|Latency|Non-2xx|requests in"
    total=$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^tollgate_jobs_submitted_total/ {s+=$2} END {print s+0}')
    while :; do
        done_=$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^tollgate_jobs_finished_total/ {s+=$2} END {print s+0}')
        [ "$done_" -ge "$total" ] && break
        sleep 0.2
    done
    end=$(date +%s.%N)
    echo "== $name: $total jobs accepted and all completed within $(echo "$end - $start" | bc -l | cut -c1-6) s of the first: $(echo "$total / ($end - $start)" | bc -l | cut -d. -f1) jobs/s end to end (8 workers)"
    kill "$gw"; wait "$gw" 2>/dev/null || true
}

echo "tollgate: $(tollgate_version "$BIN"), nginx upstream, $(nproc) cores"
run embedded "kind = \"embedded\"
path = \"$DIR/jobs.db\""
run redis "kind = \"redis\"
url = \"redis://127.0.0.1:$REDIS_PORT\""
