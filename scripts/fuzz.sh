#!/usr/bin/env bash
# Runs Tollgate's cargo-fuzz targets (fuzz/fuzz_targets/) for a bounded number of executions.
#
#   scripts/fuzz.sh                  every target, FUZZ_RUNS executions each
#   scripts/fuzz.sh request_head     one target
#
# FUZZ_RUNS    executions per target (default 10000000)
# FUZZ_ARGS    extra libFuzzer flags, e.g. "-max_total_time=600"
# FUZZ_NICE    niceness of the fuzzer (default 10), so a run leaves the machine usable
#
# Each target is built with `cargo +nightly fuzz build` and its binary started directly.
# Its working corpus is fuzz/corpus/<target>: it starts from the tracked seeds in
# fuzz/seeds/<target>/ (plus config/*.toml for config_load) and keeps what libFuzzer finds,
# so later runs start where earlier ones stopped. Crashes go to fuzz/artifacts/<target>/, and
# each run's output to fuzz/logs/<target>.log. The script stops at the first crashing target.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${FUZZ_RUNS:-10000000}"
nice_level="${FUZZ_NICE:-10}"
all=(request_head config_load problem_render)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi

mkdir -p fuzz/logs
for t in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
        echo "no fuzz target $t; the targets are: ${all[*]}" >&2
        exit 1
    fi
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus"
    seeds=(fuzz/seeds/"$t"/*)
    if [ "$t" = config_load ]; then
        seeds+=(config/*.toml)
    fi
    for f in "${seeds[@]}"; do
        [ -e "$corpus/$(basename "$f")" ] || cp "$f" "$corpus/"
    done
    dict=()
    if [ -f "fuzz/dicts/$t.dict" ]; then
        dict=("-dict=fuzz/dicts/$t.dict")
    fi
    build=()
    limits=()
    bin="fuzz/target/x86_64-unknown-linux-gnu/release/$t"
    if [ "$t" = config_load ]; then
        # The loader and its TOML parser are safe Rust, where AddressSanitizer finds nothing
        # and costs half the speed; overflow checks stay on. A separate target directory
        # keeps the sanitized builds of the other targets.
        build=(--sanitizer none --target-dir fuzz/target/nosan)
        bin="fuzz/target/nosan/x86_64-unknown-linux-gnu/release/$t"
        # A load costs time in proportion to the text, and real configs without their
        # comments fit in 4 KiB (seeds/config_load/tollgate-uncommented.toml is the example).
        limits=(-max_len=4096)
    fi
    # Built once, then started directly: `cargo fuzz run` would take the build lock a second
    # time and rebuild whatever changed in between.
    nice -n "$nice_level" cargo +nightly fuzz build "${build[@]}" "$t"
    mkdir -p "fuzz/artifacts/$t"
    echo "== $t: $runs executions (log: fuzz/logs/$t.log)"
    # One worker: the statistics at the end of the log are then those of the whole run.
    set +e
    # shellcheck disable=SC2086
    nice -n "$nice_level" "$bin" -artifact_prefix="fuzz/artifacts/$t/" "$corpus" \
        -runs="$runs" -timeout=10 -print_final_stats=1 "${dict[@]}" "${limits[@]}" ${FUZZ_ARGS:-} 2>&1 \
        | tee "fuzz/logs/$t.log" \
        | grep --line-buffered -E '^#[0-9]+[[:space:]]+(INITED|pulse|DONE)|^Done |^stat::|ERROR|panicked|^artifact_prefix|^Test unit written'
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $t failed (exit $status); see fuzz/logs/$t.log and fuzz/artifacts/$t/" >&2
        exit "$status"
    fi
done
