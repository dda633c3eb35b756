#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/) for a short, bounded time and prints one
# summary line per target: executions, executions per second, corpus size, crashes.
#
#   benches/fuzz.sh                      # every target, FUZZ_SECS (default 20) seconds each
#   FUZZ_SECS=300 benches/fuzz.sh config_client datagram_sequence
#
# Environment:
#   FUZZ_SECS        seconds per target (default 20)
#   FUZZ_SANITIZER   cargo-fuzz sanitizer (default none: the interesting failures here are panics
#                    and overflow checks, which debug assertions (-a) catch; "address" costs ~2x)
#   FUZZ_TOOLCHAIN   toolchain for cargo-fuzz (default +nightly; libFuzzer needs nightly flags)
#   FUZZ_NICE        niceness of the fuzzing processes (default 10: builds may run alongside)
#   FUZZ_ARGS        extra libFuzzer flags (default -use_value_profile=1: rewards getting closer
#                    in comparisons; it is what found the rpc_deadline overflow within seconds,
#                    at about a quarter of the executions per second)
#
# Needs `cargo install cargo-fuzz` and a nightly toolchain. The checked-in seeds in
# fuzz/corpus/<target>/ are read, never written: what a run discovers goes to
# fuzz/work/<target>/ (git-ignored), crashes to fuzz/artifacts/<target>/. Exits 1 if any target
# crashed; each crash is replayed with `cargo +nightly fuzz run <target> <file>` and belongs in
# tests/fuzz_regressions.rs once understood.
set -euo pipefail

cd "$(dirname "$0")/.."
secs=${FUZZ_SECS:-20}
san=${FUZZ_SANITIZER:-none}
tc=${FUZZ_TOOLCHAIN:-+nightly}
niceness=${FUZZ_NICE:-10}
read -r -a extra <<<"${FUZZ_ARGS-"-use_value_profile=1"}"

if ! cargo "$tc" fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing (cargo install cargo-fuzz) or toolchain $tc is not installed" >&2
    exit 2
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "$tc" fuzz list)
fi

# One build for all targets, so the timed runs below measure fuzzing, not compiling.
nice -n "$niceness" cargo "$tc" fuzz build -a -s "$san"

stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -n 1; }

crashed=0
printf '%-18s %12s %9s %7s %7s  %s\n' target runs execs/s corpus new crashes
for t in "${targets[@]}"; do
    work=fuzz/work/$t
    art=fuzz/artifacts/$t
    log=fuzz/work/$t.log
    mkdir -p "$work" "$art"
    before=$(find "$art" -type f | wc -l)
    : >"$log"
    dict=()
    case $t in config_*) dict=(-dict=fuzz/dicts/config.dict) ;; esac
    rc=0
    nice -n "$niceness" cargo "$tc" fuzz run -a -s "$san" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${dict[@]}" "${extra[@]}" \
        -artifact_prefix="$art/" >"$log" 2>&1 || rc=$?
    after=$(find "$art" -type f | wc -l)
    crashes=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes="rc=$rc"
    fi
    runs=$(stat number_of_executed_units "$log")
    eps=$(stat average_exec_per_sec "$log")
    new=$(stat new_units_added "$log")
    corpus=$(($(find "$work" -type f | wc -l) + $(find "fuzz/corpus/$t" -type f | wc -l)))
    printf '%-18s %12s %9s %7s %7s  %s\n' "$t" "${runs:-?}" "${eps:-?}" "$corpus" "${new:-?}" "$crashes"
    if [ "$crashes" != 0 ]; then
        crashed=1
        ls -t "$art" | head -n 1 | sed "s|^|    artifact: $art/|"
        grep -m 1 -A 3 "panicked at" "$log" | sed 's/^/    /' || true
        echo "    log: $log"
    fi
done
exit "$crashed"
