#!/usr/bin/env bash
# `make bench-e2e`: what one proxy hop costs, Tollgate against a bare Pingora hop and nginx.
#
# Everything runs on 127.0.0.1 with one proxy thread each, in front of one nginx process that
# answers 26 bytes of JSON. The variants:
#
#   bare       examples/bare_hop.rs: a Pingora ProxyHttp that only picks the peer (the baseline)
#   bare-mimalloc  the same binary with mimalloc preloaded (LD_PRELOAD of the system's
#              libmimalloc.so.2, package libmimalloc2.0), for a gateway built with mimalloc;
#              skipped, with a message, when the library is not installed
#   public     Tollgate, one `public` rule, no limits                (configs/public.toml)
#   keyed      Tollgate, key authentication and a scope check        (configs/keyed.toml)
#   embedded   Tollgate, every policy, embedded store                (configs/policies-embedded.toml)
#   redis      Tollgate, every policy, Redis store                   (configs/policies-redis.toml)
#   json       Tollgate, every policy and the JSON access log        (configs/policies-json.toml)
#   nginx      nginx with `map` key auth and `limit_req`, for reference (configs/reference.nginx.conf)
#
# All of them are started once. Then, for ROUNDS rounds, each variant in turn (the order rotates
# from round to round) gets a WARMUP-second wrk run and a measured DURATION-second one:
# `wrk -t1 -c64 -dDURATIONs --latency`. The proxy's CPU time (utime + stime of the whole process,
# every thread, from /proc/PID/stat) over the measured run, divided by the requests wrk
# completed, is its CPU cost per request. With two or more CPUs the proxies run on CPU 0 and wrk,
# the upstream and redis-server on CPU 1 (taskset), so each proxy has a core to itself. Right
# after each loaded run, a LATENCY-second run on one connection (`wrk -t1 -c1`) measures the
# latency of the hop itself, without the queueing of 64 connections. Then `perf record -g`
# profiles the bare hop and the embedded variant under the 64-connection load.
#
# benches/e2e/report.py turns the results into a table (medians, min-max, ratios to the bare hop
# of the same round), prints it, and writes it into docs/performance.md between the
# `bench-e2e` markers. Raw wrk outputs, perf summaries and the results are kept in
# target/bench-e2e/. Everything this script starts, it stops (by PID) when it exits.
#
# Environment (defaults in brackets):
#   ROUNDS [3]  DURATION [10] seconds measured per variant and round  WARMUP [2] seconds
#   LATENCY [4] seconds on one connection per variant and round (0 skips it)
#   PERF [1]    0 skips the profiles                 PIN [auto]  0 runs without taskset
#   WRITE_DOCS [1]  0 only prints the table          VARIANTS [all]  e.g. "bare embedded"
#
# Needs a release build (`cargo build --release --bin tollgate --example bare_hop`), wrk, nginx,
# redis-server, curl and python3; perf for the profiles. `make bench-e2e` installs and builds
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
# shellcheck source=benches/e2e/lib.sh
source benches/e2e/lib.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
LATENCY=${LATENCY:-4}
PERF=${PERF:-1}
PIN=${PIN:-auto}
WRITE_DOCS=${WRITE_DOCS:-1}
CONNS=64
PERF_SECONDS=6
# The whole run must stay well inside ten minutes.
BUDGET_SECONDS=570

ALL_VARIANTS="bare bare-mimalloc public keyed embedded redis json nginx"
VARIANTS=${VARIANTS:-$ALL_VARIANTS}
MIMALLOC_SO=$({ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | awk '$1 == "libmimalloc.so.2" {print $NF}' | head -1 || true)
if [[ " $VARIANTS " == *" bare-mimalloc "* ]] && [ -z "$MIMALLOC_SO" ]; then
    echo "bench-e2e: skipping bare-mimalloc: libmimalloc.so.2 is not installed (apt-get install libmimalloc2.0)" >&2
    VARIANTS=$(tr ' ' '\n' <<<"$VARIANTS" | grep -vx bare-mimalloc | tr '\n' ' ' || true)
fi
# The benchmark's API key (its SHA-256 is in the configs). It exists only on loopback, here.
KEY=tg_live_bench_e2e_0000000000000000000000
KEY_HASH=487c084bf6ca4d97907acf63a58d40f869541d82c1a9f46f156bc29c09dbf323
URL_PATH=/api/items/42

TOLLGATE=target/release/tollgate
BARE=target/release/examples/bare_hop
OUT=target/bench-e2e

die() {
    echo "bench-e2e: $*" >&2
    exit 1
}

for v in $VARIANTS; do
    case " $ALL_VARIANTS " in *" $v "*) ;; *) die "unknown variant \`$v\` (known: $ALL_VARIANTS)" ;; esac
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ && "$DURATION" =~ ^[1-9][0-9]*$ && "$WARMUP" =~ ^[0-9]+$ && "$LATENCY" =~ ^[0-9]+$ ]] ||
    die "ROUNDS, DURATION, WARMUP and LATENCY must be whole numbers (ROUNDS and DURATION at least 1)"
for tool in wrk nginx curl python3 ss; do
    command -v "$tool" >/dev/null || die "$tool is not installed; run: scripts/ensure-deps.sh --bench"
done
if [[ " $VARIANTS " == *" redis "* ]]; then
    for tool in redis-server redis-cli; do
        command -v "$tool" >/dev/null || die "$tool is not installed; run: scripts/ensure-deps.sh --bench"
    done
fi
[ -x "$TOLLGATE" ] || die "$TOLLGATE is missing; run: cargo build --release --bin tollgate"
[ -x "$BARE" ] || die "$BARE is missing; run: cargo build --release --example bare_hop"
NGINX=$(command -v nginx)
if [ "$PERF" = 1 ] && ! perf --version >/dev/null 2>&1; then
    echo "bench-e2e: perf is not available; the profiles are skipped" >&2
    PERF=0
fi

nvariants=$(wc -w <<<"$VARIANTS")
estimate=$((nvariants * ROUNDS * (WARMUP + DURATION + LATENCY + 1) + 15))
[ "$PERF" = 1 ] && estimate=$((estimate + 2 * (WARMUP + PERF_SECONDS + 8)))
[ "$estimate" -le "$BUDGET_SECONDS" ] ||
    die "$nvariants variants x $ROUNDS rounds x $((WARMUP + DURATION + LATENCY))s would take about ${estimate}s, more than ${BUDGET_SECONDS}s; lower ROUNDS or DURATION"

ncpu=$(nproc)
if [ "$PIN" = auto ]; then
    if [ "$ncpu" -ge 2 ]; then PIN=1; else PIN=0; fi
fi
if [ "$PIN" = 1 ]; then
    PROXY_PIN=(taskset -c 0)
    CLIENT_PIN=(taskset -c 1)
    PINNING="proxies on CPU 0; wrk, the upstream nginx and redis-server on CPU 1 (taskset)"
else
    PROXY_PIN=()
    CLIENT_PIN=()
    PINNING="not pinned"
fi

WORK=$(mktemp -d /tmp/tollgate-bench-e2e.XXXXXX)
mkdir -p "$WORK/nginx-tmp" "$OUT/raw"
: >"$OUT/store-traffic.tsv"
rm -f "$OUT"/raw/* "$OUT"/results.tsv "$OUT"/perf-*.txt "$OUT"/json-log-bytes-per-request.txt
started_at=$(date +%s)

# Every process this script starts, by PID, so that the exit trap stops exactly those.
declare -A PID_OF=()
SAMPLER=""

# Stops the given child processes: SIGTERM, then SIGKILL for any still there after 5 s.
stop_pids() {
    local pid i left
    for pid in "$@"; do
        ours "$pid" && kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 1 50); do
        left=0
        for pid in "$@"; do
            ours "$pid" && left=1
        done
        [ "$left" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "$@"; do
        ours "$pid" && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # The proxies, the upstream, redis-server, the load sampler and any wrk still running.
    # shellcheck disable=SC2046
    stop_pids "${PID_OF[@]}" ${SAMPLER:+"$SAMPLER"} $(jobs -p)
    wait 2>/dev/null || true
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Fills a config template's @NAME@ placeholders.
render() {
    local template=$1 out=$2 port=$3 admin=${4:-0}
    sed -e "s|@DIR@|$WORK|g" -e "s|@PORT@|$port|g" -e "s|@ADMIN_PORT@|$admin|g" \
        -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@REDIS_URL@|redis://127.0.0.1:${REDIS_PORT:-0}|g" \
        -e "s|@KEY@|$KEY|g" -e "s|@KEY_HASH@|$KEY_HASH|g" "$template" >"$out"
}

# Waits until `curl URL` answers with one of the statuses in $2 (a regex), for at most 15 s.
wait_http() {
    local url=$1 want=$2 name=$3 i code
    for i in $(seq 1 150); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ "$code" =~ ^($want)$ ]] && return 0
        kill -0 "${PID_OF[$name]}" 2>/dev/null || die "$name exited while starting; its log: $(tail -5 "$WORK/$name.log")"
        sleep 0.1
    done
    die "$name did not answer $url within 15 s (last status: $code); its log: $(tail -5 "$WORK/$name.log")"
}

launch() { # name, pin (proxy|client), command...
    local name=$1 pin=$2
    shift 2
    local -a prefix=()
    if [ "$pin" = proxy ]; then prefix=("${PROXY_PIN[@]}"); else prefix=("${CLIENT_PIN[@]}"); fi
    "${prefix[@]}" "$@" >>"$WORK/$name.log" 2>&1 &
    PID_OF[$name]=$!
}

declare -A PORT_OF=() ADMIN_OF=() KEYED=() LABEL=()
LABEL=(
    [bare]="bare Pingora hop"
    [bare-mimalloc]="bare Pingora hop, mimalloc preloaded"
    [public]="Tollgate, public rule, no limits"
    [keyed]="Tollgate, key + scopes"
    [embedded]="Tollgate, every policy, embedded store"
    [redis]="Tollgate, every policy, Redis"
    [json]="Tollgate, every policy + JSON access log"
    [nginx]="nginx, map key auth + limit_req"
)
# Which variants get the Authorization header (the public rule would check a key it was given).
KEYED=([bare]=1 [bare-mimalloc]=1 [public]=0 [keyed]=1 [embedded]=1 [redis]=1 [json]=1 [nginx]=1)
declare -A CONFIG_OF=([public]=public [keyed]=keyed [embedded]=policies-embedded [redis]=policies-redis [json]=policies-json)

wants() { [[ " $VARIANTS " == *" $1 "* ]]; }

echo "bench-e2e: working directory $WORK; results in $OUT"
cat /proc/loadavg >"$OUT/loadavg-start.txt"
sample_load >"$OUT/load-samples.txt" 2>/dev/null &
SAMPLER=$!

# The upstream.
free_port UPSTREAM_PORT
render benches/e2e/configs/upstream.nginx.conf "$WORK/upstream.nginx.conf" 0
launch upstream client "$NGINX" -p "$WORK" -c "$WORK/upstream.nginx.conf" -e "$WORK/upstream.error.log"
wait_http "http://127.0.0.1:$UPSTREAM_PORT/" 200 upstream
body=$(curl -s "http://127.0.0.1:$UPSTREAM_PORT/" || true)
[ "${#body}" -eq 26 ] || die "the upstream answered ${#body} bytes, not 26: $body"

if wants redis; then
    free_port REDIS_PORT
    launch redis-server client redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" --daemonize no
    for _ in $(seq 1 100); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "redis-server did not start; its log: $(tail -5 "$WORK/redis-server.log")"
fi

auth=(-H "Authorization: Bearer $KEY")
for v in $VARIANTS; do
    free_port port
    PORT_OF[$v]=$port
    case $v in
        bare)
            launch bare proxy "$BARE" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT"
            wait_http "http://127.0.0.1:$port/" 200 bare
            ;;
        bare-mimalloc)
            launch bare-mimalloc proxy env LD_PRELOAD="$MIMALLOC_SO" "$BARE" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT"
            wait_http "http://127.0.0.1:$port/" 200 bare-mimalloc
            grep -q libmimalloc "/proc/${PID_OF[bare-mimalloc]}/maps" || die "bare-mimalloc did not load $MIMALLOC_SO"
            ;;
        nginx)
            render benches/e2e/configs/reference.nginx.conf "$WORK/reference.nginx.conf" "$port"
            launch nginx proxy "$NGINX" -p "$WORK" -c "$WORK/reference.nginx.conf" -e "$WORK/reference.error.log"
            wait_http "http://127.0.0.1:$port/" 401 nginx
            ;;
        *)
            free_port admin
            ADMIN_OF[$v]=$admin
            render "benches/e2e/configs/${CONFIG_OF[$v]}.toml" "$WORK/$v.toml" "$port" "$admin"
            "$TOLLGATE" check -c "$WORK/$v.toml" >/dev/null || die "configs/${CONFIG_OF[$v]}.toml does not load"
            launch "$v" proxy "$TOLLGATE" run -c "$WORK/$v.toml"
            wait_http "http://127.0.0.1:$admin/readyz" 200 "$v"
            ;;
    esac
    # The request of the benchmark must succeed, and a keyed variant must refuse it without a key.
    if [ "${KEYED[$v]}" = 1 ]; then
        code=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" "http://127.0.0.1:$port$URL_PATH" || true)
        if [[ "$v" != bare* ]]; then
            nokey=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port$URL_PATH" || true)
            [ "$nokey" = 401 ] || die "$v answered $nokey without a key, not 401"
        fi
    else
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port$URL_PATH" || true)
    fi
    [ "$code" = 200 ] || die "$v answered $code to the benchmark request, not 200"
    echo "bench-e2e: $v (${LABEL[$v]}) listens on 127.0.0.1:$port, pid ${PID_OF[$v]}"
done

CLK_TCK=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks (fields 14 and 15; the name may hold spaces).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # After the name: field 3 is the first word, so utime and stime are words 12 and 13.
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

# Runs wrk against a variant, pinned; arguments after the variant and the connection count go to
# wrk.
wrk_on() {
    local v=$1 conns=$2
    shift 2
    local -a args=()
    [ "${KEYED[$v]}" = 1 ] && args=("${auth[@]}")
    "${CLIENT_PIN[@]}" timeout $((DURATION + WARMUP + PERF_SECONDS + 30)) \
        wrk -t1 -c"$conns" "$@" "${args[@]}" "http://127.0.0.1:${PORT_OF[$v]}$URL_PATH" &
    local wpid=$!
    wait "$wpid" || die "wrk failed against $v (status $?)"
}

# Turns "1.23ms" / "456.00us" / "1.01s" into microseconds.
to_us() {
    awk -v t="$1" 'BEGIN {
        v = t + 0
        if (t ~ /us$/) m = 1; else if (t ~ /ms$/) m = 1000; else if (t ~ /s$/) m = 1000000; else m = 1
        printf "%.1f", v * m
    }'
}

printf 'variant\tround\trequests\trps\tp50_us\tp99_us\tcpu_us\tcpu_util\tnon2xx\terrors\tupstream_cpu_us\tone_rps\tone_p50_us\tone_p99_us\n' >"$OUT/results.tsv"

# Store round trips of a Tollgate variant so far, per operation ("op count" lines).
store_round_trips() {
    curl -s "http://127.0.0.1:${ADMIN_OF[$1]}/metrics" |
        awk -F'[{}" ]+' '/^tollgate_store_round_trips_total\{/ {
            for (i = 2; i < NF; i++) if ($i ~ /^op=/) { op = $(i + 1) }
            n[op] += $NF
        } END { for (o in n) printf "%s %d\n", o, n[o] }' | sort
}

# "op count" lines of `after` minus `before`.
round_trip_delta() {
    join -a2 -e0 -o '2.1,1.2,2.2' <(echo "$1") <(echo "$2") | awk '{ printf "%s %d\n", $1, $3 - $2 }'
}

measure() { # variant, round
    local v=$1 r=$2
    local raw="$OUT/raw/$v.round$r.txt" pid=${PID_OF[$1]} up=${PID_OF[upstream]}
    [ "$v" = json ] && : >"$WORK/json.log"
    if [ "$WARMUP" -gt 0 ]; then
        wrk_on "$v" "$CONNS" -d"${WARMUP}s" >/dev/null
    fi
    local c0 u0 c1 u1 t0 t1
    local rt0=""
    [ "$v" = redis ] && rt0=$(store_round_trips "$v")
    c0=$(cpu_ticks "$pid")
    u0=$(cpu_ticks "$up")
    t0=$(date +%s%N)
    wrk_on "$v" "$CONNS" -d"${DURATION}s" --latency >"$raw"
    t1=$(date +%s%N)
    c1=$(cpu_ticks "$pid")
    u1=$(cpu_ticks "$up")
    kill -0 "$pid" 2>/dev/null || die "$v exited during the run; its log: $(tail -5 "$WORK/$v.log")"
    local requests rps p50 p99 non2xx errors
    requests=$(awk '/requests in/ {print $1}' "$raw")
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$raw")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$raw")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$raw")")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$raw")
    errors=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$raw")
    if [ -z "$requests" ] || [ "$requests" -eq 0 ]; then die "wrk completed no request against $v; see $raw"; fi
    if [ "$v" = redis ]; then
        # Store round trips under load, per request and per operation.
        round_trip_delta "$rt0" "$(store_round_trips "$v")" |
            awk -v n="$requests" -v r="$r" -v s="$DURATION" '{
                printf "load\tround %s\t%s\t%d\t%.5f per request\t%.1f/s\n", r, $1, $2, $2 / n, $2 / s
            }' >>"$OUT/store-traffic.tsv"
    fi
    # The hop's own latency: one connection, no queue.
    local one="$OUT/raw/$v.round$r.one-connection.txt" one_rps=0 one_p50=0 one_p99=0
    if [ "$LATENCY" -gt 0 ]; then
        wrk_on "$v" 1 -d"${LATENCY}s" --latency >"$one"
        one_rps=$(awk '/^Requests\/sec:/ {print $2}' "$one")
        one_p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$one")")
        one_p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$one")")
        non2xx=$((${non2xx:-0} + $(awk '/Non-2xx or 3xx responses:/ {n = $NF} END {print n + 0}' "$one")))
    fi
    awk -v c=$((c1 - c0)) -v u=$((u1 - u0)) -v hz="$CLK_TCK" -v n="$requests" -v ns=$((t1 - t0)) \
        -v fields="$v	$r	$requests	$rps	$p50	$p99" -v bad="${non2xx:-0}	${errors:-0}" \
        -v one="$one_rps	$one_p50	$one_p99" 'BEGIN {
        printf "%s\t%.2f\t%.2f\t%s\t%.2f\t%s\n", fields, c / hz * 1e6 / n, c / hz / (ns / 1e9), bad, u / hz * 1e6 / n, one
    }' >>"$OUT/results.tsv"
    tail -1 "$OUT/results.tsv" | awk -F'\t' -v label="${LABEL[$v]}" '{
        printf "  %-42s %6.0f req/s  p50 %6.0f us  p99 %6.0f us  %5.1f CPU us/req", label, $4, $5, $6, $7
        if ($12 > 0) printf "  | 1 conn: p50 %4.0f us  p99 %5.0f us", $13, $14
        if ($9 + $10 > 0) printf "  (non-2xx %d, socket errors %d)", $9, $10
        printf "\n"
    }'
}

read -r -a order <<<"$VARIANTS"
n=${#order[@]}
for r in $(seq 1 "$ROUNDS"); do
    echo "bench-e2e: round $r of $ROUNDS (${DURATION}s per variant after ${WARMUP}s of warm-up)"
    for i in $(seq 0 $((n - 1))); do
        measure "${order[$(((i + r - 1) % n))]}" "$r"
    done
done
if wants json; then
    # Bytes of access log per request, from the last measured run.
    json_bytes=$(stat -c %s "$WORK/json.log")
    json_requests=$(awk '/requests in/ {print $1}' "$OUT/raw/json.round$ROUNDS.txt")
    awk -v b="$json_bytes" -v n="$json_requests" 'BEGIN { printf "%.0f\n", b / n }' >"$OUT/json-log-bytes-per-request.txt"
fi

# Profiles: where the CPU goes in the bare hop and in the gateway with every policy on.
perf_variants=()
if [ "$PERF" = 1 ]; then
    for v in bare embedded; do wants "$v" && perf_variants+=("$v"); done
fi
for v in "${perf_variants[@]}"; do
    echo "bench-e2e: profiling $v (perf record -g, ${PERF_SECONDS}s under load)"
    wrk_on "$v" "$CONNS" -d"$((WARMUP + PERF_SECONDS + 2))s" >/dev/null &
    load=$!
    sleep "$((WARMUP + 1))"
    if perf record -F 999 -g -p "${PID_OF[$v]}" -o "$WORK/perf.$v.data" -- sleep "$PERF_SECONDS" \
        >"$WORK/perf.$v.record.log" 2>&1; then
        {
            perf report -i "$WORK/perf.$v.data" --no-children --stdio --sort dso -g none --percent-limit 0.5 2>/dev/null |
                grep -E '^ +[0-9.]+%' || true
            echo "--"
            perf report -i "$WORK/perf.$v.data" --no-children --stdio --sort dso,sym -g none --percent-limit 0.8 \
                2>/dev/null | grep -E '^ +[0-9.]+%' | head -25 || true
            echo "--"
            perf report -i "$WORK/perf.$v.data" --no-children --stdio --dsos "$(basename "$(readlink "/proc/${PID_OF[$v]}/exe")")" \
                --sort sym -g none --percent-limit 0.25 2>/dev/null | grep -E '^ +[0-9.]+%' | head -25 || true
        } >"$OUT/perf-$v.txt"
    else
        echo "bench-e2e: perf record failed (see below); the profiles are skipped" >&2
        tail -3 "$WORK/perf.$v.record.log" >&2
        echo "perf record failed: $(tail -1 "$WORK/perf.$v.record.log")" >"$OUT/perf-$v.txt"
    fi
    wait "$load" || true
done

if wants redis; then
    # Background traffic of an idle instance: directory polls, ledger writes, lease renewals and
    # hand-backs, slot renewals, fleet heartbeats.
    idle=10
    rt0=$(store_round_trips redis)
    sleep "$idle"
    round_trip_delta "$rt0" "$(store_round_trips redis)" |
        awk -v s="$idle" '{ printf "idle\t%ds\t%s\t%d\t\t%.1f/s\n", s, $1, $2, $2 / s }' >>"$OUT/store-traffic.tsv"
fi

cat /proc/loadavg >"$OUT/loadavg-end.txt"
finished_at=$(date +%s)

# What was measured, on what: report.py writes it above the table.
{
    echo "date	$(date -u +%Y-%m-%d\ %H:%M\ UTC)"
    echo "runtime_s	$((finished_at - started_at))"
    echo "command	${BENCH_COMMAND:-benches/e2e/run.sh}"
    echo "settings	ROUNDS=$ROUNDS DURATION=$DURATION WARMUP=$WARMUP LATENCY=$LATENCY PERF=$PERF PIN=$PIN"
    echo "nproc	$ncpu"
    echo "cpu	$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "memory	$(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "kernel	$(uname -sr)"
    echo "tollgate	$(tollgate_version "$TOLLGATE")"
    echo "pingora	$(pingora_version)"
    echo "rustc	$(rustc --version 2>/dev/null || echo '?')"
    echo "nginx	$("$NGINX" -v 2>&1 | sed 's|^nginx version: nginx/||')"
    echo "wrk	$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "redis	$(redis-server --version | awk '{print $3}' | sed 's/^v=//')"
    echo "perf	$(perf --version 2>/dev/null || echo 'not available')"
    echo "allocators	tollgate: $(allocator_of "$TOLLGATE"); bare_hop: $(allocator_of "$BARE")"
    echo "pinning	$PINNING"
    echo "connections	$CONNS"
    echo "script_pid	$$"
    echo "variants	$VARIANTS"
    echo "perf_variants	${perf_variants[*]:-}"
    if [ -f "$OUT/json-log-bytes-per-request.txt" ]; then echo "json_log_bytes	$(cat "$OUT/json-log-bytes-per-request.txt")"; fi
} >"$OUT/meta.tsv"
for name in "${!LABEL[@]}"; do echo "label	$name	${LABEL[$name]}"; done >>"$OUT/meta.tsv"

report_args=("$OUT")
[ "$WRITE_DOCS" = 1 ] && report_args+=(--write docs/performance.md)
python3 benches/e2e/report.py "${report_args[@]}"
echo "bench-e2e: done in $((finished_at - started_at))s; raw outputs in $ROOT/$OUT"
