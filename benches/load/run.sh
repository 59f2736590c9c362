#!/usr/bin/env bash
# Load benchmark of the RELEASE Arbiter server against an EMPTY tonic server
# that implements the same `arbiter.v1.Authorizer` service (same proto, same
# generated code, same runtime, constant ALLOW, no evaluation).
#
# Both servers get the same h2load load (gRPC unary over h2c: a POST of one
# length-prefixed CheckRequest taken from policies/tests/rbac.json), in
# alternating runs (empty, arbiter, empty, arbiter, ...); the script prints the
# median requests/s, p50 and p99 of each server and the ratio Arbiter/empty.
#
#   bash benches/load/run.sh
#
# Knobs (environment): ROUNDS=3 DURATION=10 WARMUP=2 (seconds per run),
# CLIENTS=4 STREAMS=8 (h2 connections, concurrent streams per connection),
# THREADS=1 (h2load threads), GOAL=0.6 (ratio goal), STRICT=1 (fail below it),
# ARBITER_EXTRA_ARGS (more `arbiter serve` flags, e.g. `--decision-cache-size 0`
# to measure full Cedar evaluation on every request instead of cache hits).
#
# Exit status: 0 on success; 1 when Arbiter's responses are not gRPC OK
# ALLOW (so the numbers would measure errors) or the goal is missed with
# STRICT=1; 2 on any other failure.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-4}
STREAMS=${STREAMS:-8}
THREADS=${THREADS:-1}
GOAL=${GOAL:-0.6}
STRICT=${STRICT:-0}

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
METHOD=/arbiter.v1.Authorizer/Check

need_tools h2load:nghttp2-client curl:curl

# --- build -------------------------------------------------------------------
echo "building (release): arbiter, examples empty_authorizer and grpc_body" >&2
cargo build --release --quiet --bin arbiter --example empty_authorizer --example grpc_body
ARBITER=$TARGET/arbiter
EMPTY=$TARGET/examples/empty_authorizer
BODYTOOL=$TARGET/examples/grpc_body
for binary in "$ARBITER" "$EMPTY" "$BODYTOOL"; do
  [[ -x $binary ]] || fail "$binary was not built"
done

# --- servers -----------------------------------------------------------------
take_port EMPTY_PORT
take_port ARBITER_PORT
take_port ADMIN_PORT

EXTRA_ARGS=${ARBITER_EXTRA_ARGS:-}
clear_arbiter_env

"$EMPTY" "127.0.0.1:$EMPTY_PORT" >"$WORK/empty.log" 2>&1 &
PIDS+=($!)
# shellcheck disable=SC2086 # extra flags are meant to split
"$ARBITER" serve --listen "127.0.0.1:$ARBITER_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
  ${EXTRA_ARGS} >"$WORK/arbiter.log" 2>&1 &
PIDS+=($!)

BODY=$WORK/check_request.bin
"$BODYTOOL" encode "$BODY"

# One gRPC call with curl: fills $WORK/<name>.headers (headers and trailers)
# and $WORK/<name>.response (the framed CheckResponse).
grpc_call() {
  local port=$1 name=$2
  curl -sS --http2-prior-knowledge --max-time 5 -X POST \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary "@$BODY" -D "$WORK/$name.headers" -o "$WORK/$name.response" \
    "http://127.0.0.1:$port$METHOD"
}

wait_ready "$ADMIN_PORT" "${PIDS[1]}" "$WORK/arbiter.log"
for _ in $(seq 100); do
  grpc_call "$EMPTY_PORT" empty 2>/dev/null && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$WORK/empty.log" >&2; fail "empty server exited"; }
  sleep 0.1
done

# --- the responses must be gRPC OK and ALLOW, or we would measure errors -----
verify() {
  local port=$1 name=$2
  grpc_call "$port" "$name" || not_ok "$name: the gRPC call failed"
  grep -qiE '^grpc-status: *0[[:space:]]*$' "$WORK/$name.headers" ||
    not_ok "$name: no grpc-status 0 in the response: $(tr -d '\r' <"$WORK/$name.headers" | tr '\n' ' ')"
  local decoded
  decoded=$("$BODYTOOL" decode "$WORK/$name.response") ||
    not_ok "$name: the response is not DECISION_ALLOW"
  echo "$name: grpc-status 0, $decoded" >&2
}
verify "$EMPTY_PORT" empty
verify "$ARBITER_PORT" arbiter

# The decision counters of Arbiter, to check afterwards that every request of
# the load was answered with an ALLOW (h2load itself only sees HTTP 200).
decisions() {
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v outcome="$1" '
    $1 ~ /^arbiter_decisions_total\{/ && index($1, "outcome=\"" outcome "\"") { sum += $2 }
    END { printf "%d\n", sum }'
}

# --- load --------------------------------------------------------------------
# run_load PORT NAME ROUND: sets R_RPS, R_P50, R_P99 (microseconds) and
# R_SUCCEEDED. Runs in the main shell, so its exits end the script.
run_load() {
  local port=$1 name=$2 round=$3
  local out=$WORK/$name.$round.out log=$WORK/$name.$round.log
  h2load -D "$DURATION" --warm-up-time "$WARMUP" -c "$CLIENTS" -m "$STREAMS" -t "$THREADS" \
    -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
    --log-file "$log" "http://127.0.0.1:$port$METHOD" >"$out" 2>&1 ||
    { cat "$out" >&2; fail "h2load failed against $name"; }
  local rps done succeeded failed errored timeout ok2xx
  rps=$(awk '/^finished in/ { sub(/,/, "", $4); print $4 }' "$out")
  read -r done succeeded failed errored timeout < <(awk '/^requests:/ {
    print $6, $8, $10, $12, $14 }' "$out")
  ok2xx=$(awk '/^status codes:/ { print $3 }' "$out")
  if [[ -z $rps || -z $succeeded ]]; then
    cat "$out" >&2
    fail "cannot read h2load's summary"
  fi
  # h2load may count a stream cut at the end of the duration as succeeded
  # without its status: allow at most one such stream per concurrent stream.
  if ((succeeded == 0 || failed + errored + timeout > 0 || done != succeeded ||
    ok2xx + CLIENTS * STREAMS < succeeded)); then
    cat "$out" >&2
    [[ $name == arbiter ]] && not_ok "arbiter: requests failed under load"
    fail "$name: requests failed under load"
  fi
  # Per-request times (microseconds, third column) -> nearest-rank percentiles.
  local p50 p99
  read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '
    { v[NR] = $1 }
    function rank(p,   i) { i = int(p * NR); if (i < p * NR) i++; if (i < 1) i = 1; return v[i] }
    END { print rank(0.50), rank(0.99) }')
  R_RPS=$rps R_P50=$p50 R_P99=$p99 R_SUCCEEDED=$succeeded
}


echo "load: h2load -D ${DURATION}s (+${WARMUP}s warm-up) -c $CLIENTS -m $STREAMS -t $THREADS" \
  "= $((CLIENTS * STREAMS)) concurrent streams; $ROUNDS rounds alternating empty, arbiter;" \
  "$(nproc) cores" >&2
E_RPS=() E_P50=() E_P99=() A_RPS=() A_P50=() A_P99=() RATIOS=()
for round in $(seq "$ROUNDS"); do
  run_load "$EMPTY_PORT" empty "$round"
  E_RPS+=("$R_RPS") E_P50+=("$R_P50") E_P99+=("$R_P99")
  printf 'round %d  empty    %10.0f req/s  p50 %6d us  p99 %6d us\n' \
    "$round" "$R_RPS" "$R_P50" "$R_P99" >&2

  allow_before=$(decisions allow)
  other_before=$(($(decisions deny) + $(decisions invalid_request)))
  run_load "$ARBITER_PORT" arbiter "$round"
  allow_after=$(decisions allow)
  other_after=$(($(decisions deny) + $(decisions invalid_request)))
  # Warm-up requests are decisions too, so at least `succeeded` allows.
  if ((other_after != other_before || allow_after - allow_before < R_SUCCEEDED)); then
    not_ok "arbiter: $((allow_after - allow_before)) allows and" \
      "$((other_after - other_before)) other decisions for $R_SUCCEEDED successful requests"
  fi
  A_RPS+=("$R_RPS") A_P50+=("$R_P50") A_P99+=("$R_P99")
  RATIOS+=("$(awk -v a="$R_RPS" -v e="${E_RPS[-1]}" 'BEGIN { printf "%.3f", a / e }')")
  printf 'round %d  arbiter  %10.0f req/s  p50 %6d us  p99 %6d us  (ratio %s)\n' \
    "$round" "$R_RPS" "$R_P50" "$R_P99" "${RATIOS[-1]}" >&2
done
verify "$ARBITER_PORT" arbiter

e_rps=$(median "${E_RPS[@]}")
a_rps=$(median "${A_RPS[@]}")
ratio=$(awk -v a="$a_rps" -v e="$e_rps" 'BEGIN { printf "%.3f", a / e }')
echo
echo "median of $ROUNDS runs, $((CLIENTS * STREAMS)) concurrent streams ($CLIENTS connections x $STREAMS):"
printf '  %-8s %10s %10s %10s\n' server 'req/s' 'p50 (us)' 'p99 (us)'
printf '  %-8s %10.0f %10.0f %10.0f\n' empty "$e_rps" "$(median "${E_P50[@]}")" "$(median "${E_P99[@]}")"
printf '  %-8s %10.0f %10.0f %10.0f\n' arbiter "$a_rps" "$(median "${A_P50[@]}")" "$(median "${A_P99[@]}")"
echo "  throughput ratio arbiter/empty: $ratio (per round: ${RATIOS[*]}; goal >= $GOAL)"
if awk -v r="$ratio" -v g="$GOAL" 'BEGIN { exit !(r < g) }'; then
  echo "  below the goal" >&2
  [[ $STRICT == 1 ]] && exit 1
fi
exit 0
