#!/usr/bin/env bash
# The policy index's differential test (tests/policy_index.rs) for longer
# than CI runs it: random policy sets, entity graphs and requests, the
# indexed answer against the whole set's on every request.
#
#   bash benches/index_differential.sh [rounds] [seed]
#
# Defaults: 2,000 rounds (150 requests each) from a seed taken from the
# clock, printed so a failure can be replayed with the same seed.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2000}"
seed="${2:-$(date +%s)}"
echo "policy index differential: $rounds rounds from seed $seed"
ARBITER_INDEX_DIFF_ROUNDS="$rounds" ARBITER_INDEX_DIFF_SEED="$seed" \
    cargo test --release --test policy_index -- --nocapture
