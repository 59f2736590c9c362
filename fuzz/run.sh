#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600), JOBS at a time (default
# 2), and prints the executions each got (libFuzzer's -print_final_stats=1).
#
#   fuzz/run.sh [SECONDS]            all targets
#   TARGETS="jwt spool_reader" fuzz/run.sh 60
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# New inputs go to a scratch corpus ($FUZZ_WORK, default
# /tmp/arbiter-fuzz); the committed seeds in fuzz/corpus/<target> are read,
# not grown. Crashes land in fuzz/artifacts/<target>/: commit the ones that
# found a bug (tests/fuzz_corpus.rs replays them).
set -euo pipefail

seconds=${1:-600}
jobs=${JOBS:-2}
here=$(cd "$(dirname "$0")" && pwd)
work=${FUZZ_WORK:-/tmp/arbiter-fuzz}
targets=${TARGETS:-"ext_authz_wire check_request entities_and_context jwt policy_loader spool_reader"}
mkdir -p "$work/logs"

cd "$here"
nice -n 10 cargo +nightly fuzz build -O

run_one() {
    local target=$1
    mkdir -p "$work/corpus/$target" "$here/artifacts/$target"
    # -timeout: one input taking longer is a hang (a finding);
    # -rss_limit_mb: so is one that takes more memory.
    nice -n 10 cargo +nightly fuzz run -O "$target" \
        "$work/corpus/$target" "$here/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 \
        >"$work/logs/$target.log" 2>&1 || echo "$target: exit $? (see $work/logs/$target.log)"
}

running=0
for target in $targets; do
    run_one "$target" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

printf '%-22s %8s %14s %10s %8s\n' target seconds executions exec/s crashes
for target in $targets; do
    log=$work/logs/$target.log
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    crashes=$(grep -c '^==[0-9]*== ERROR\|^SUMMARY: libFuzzer\|deadly signal\|panicked at' "$log" || true)
    printf '%-22s %8s %14s %10s %8s\n' "$target" "$seconds" "$execs" "$rate" "$crashes"
done
