#!/usr/bin/env bash
# Does a request at the limits delay ordinary ones? The RELEASE server with
# the embedded example; `examples/heavy_mix.rs` sends ordinary Checks
# open-loop at RATE per second (varied contexts: the decision cache does not
# answer them) and measures their latency, in phases that alternate between
# alone and alongside HEAVY clients sending, back to back, requests with
# their own entities at the default limits (1,000 roles, a chain 32 deep, a
# closure of ~10,000 (entity, ancestor) pairs).
# Prints each phase and the ratio of the medians of ordinary p99 (with
# heavy / alone); the goal (issue 22) is <= 2.
#
#   bash benches/heavy.sh
#
# Knobs: SECONDS_PER_PHASE=5 RATE=1000 HEAVY=4 ROUNDS=3, ARBITER_EXTRA_ARGS
# (e.g. `--heavy-workers 2`).
set -euo pipefail
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-5}
RATE=${RATE:-1000}
HEAVY=${HEAVY:-4}
ROUNDS=${ROUNDS:-3}

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

echo "building (release): arbiter, example heavy_mix" >&2
cargo build --release --quiet --bin arbiter --example heavy_mix
ARBITER=$TARGET/arbiter
MIX=$TARGET/examples/heavy_mix

take_port PORT
take_port ADMIN_PORT
clear_arbiter_env
# shellcheck disable=SC2086 # extra flags are meant to split
"$ARBITER" serve --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
  ${ARBITER_EXTRA_ARGS:-} >"$WORK/arbiter.log" 2>&1 &
PIDS+=($!)
wait_ready "$ADMIN_PORT" "${PIDS[0]}" "$WORK/arbiter.log"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD)  date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "command: SECONDS_PER_PHASE=$SECONDS_PER_PHASE RATE=$RATE HEAVY=$HEAVY ROUNDS=$ROUNDS bash benches/heavy.sh"
"$MIX" "127.0.0.1:$PORT" "$SECONDS_PER_PHASE" "$RATE" "$HEAVY" "$ROUNDS"
