# shellcheck shell=bash
# Helpers shared by benches/e2e/run.sh and benches/e2e/scale.sh (sourced, not run).

# Whether a PID is still a running child of this script: a PID whose parent is someone else by
# now is not ours to stop.
ours() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    local -a f
    read -r -a f <<<"$stat"
    [ "${f[1]}" = "$$" ] && [ "${f[0]}" != Z ]
}

# Sets the variable named $1 to a port on 127.0.0.1 that no TCP socket uses and that this script
# has not handed out yet (a variable, not output: a $(...) subshell would forget what it handed
# out). Ports come from below the kernel's ephemeral range, so that an outgoing connection cannot
# take one between the check and the bind.
declare -A TAKEN=()
free_port() {
    local p low=32768
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    [ "$low" -gt 12000 ] || low=32768
    while :; do
        p=$((10000 + RANDOM % (low - 10000)))
        [ -z "${TAKEN[$p]:-}" ] || continue
        if [ -z "$(ss -Htan "sport = :$p")" ]; then
            TAKEN[$p]=1
            printf -v "$1" '%s' "$p"
            return
        fi
    done
}

# The global allocator a binary was linked with, from its symbol table.
allocator_of() {
    local sym
    if ! command -v nm >/dev/null; then
        echo "unknown (nm, from binutils, is not installed)"
        return
    fi
    sym=$(nm "$1" 2>/dev/null | awk '{print $NF}' | grep -xE 'mi_free|_rjem_malloc|je_malloc' | head -1 || true)
    case $sym in
        mi_free) echo mimalloc ;;
        _rjem_malloc | je_malloc) echo jemalloc ;;
        *) echo "the system allocator (glibc malloc)" ;;
    esac
}

# "tollgate 0.1.0 (abc1234)" for a binary, noting local changes to the sources it was built from.
tollgate_version() {
    local changes=""
    git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || changes=", with local changes"
    echo "$("$1" --version 2>/dev/null | head -1) ($(git rev-parse --short HEAD 2>/dev/null || echo '?')$changes)"
}

# The Pingora version in Cargo.lock.
pingora_version() {
    awk '/^name = "pingora"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock
}

# Every 5 s, a snapshot of the machine's CPU counters and of each process's pid, parent, CPU
# seconds and name, so that the report can say what else ran (report.py, `other_load`). Run it
# in the background; SIGTERM ends it.
sample_load() {
    local nap=""
    trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
        echo "@ $(date +%s) $(head -1 /proc/stat)"
        ps -eo pid=,ppid=,times=,comm= 2>/dev/null || true
        sleep 5 &
        nap=$!
        wait "$nap" || true
    done
}
