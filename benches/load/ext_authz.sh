#!/usr/bin/env bash
# Load benchmark of Envoy ext_authz `Check` against Arbiter's own-API `Check`
# on the SAME release server, for the SAME decision, in the same run.
#
# The server runs `deploy/arbiter/ext-authz.toml` with keys from
# `tests/fixtures/jwt/jwks-a.json`: ext_authz requests carry a bearer RS256
# JWT that is verified (and then served from the token cache, as in
# production where a client reuses its token), go through route matching and
# path normalisation, and build the context from the source address and the
# `mfa` claim. Both sides ask "may carol read acme-roadmap from 10.1.2.3 with
# MFA?" (ALLOW, `viewer-can-read`): own-API is `grpc_body encode`'s default
# case, ext_authz is `ext_authz_body encode`.
#
#   bash benches/load/ext_authz.sh
#
# Rounds alternate the two sides, own-API first in odd rounds and ext_authz
# first in even ones. The summary gives the ratio of the medians (which the
# goal is checked against) and the median of the rounds' own ratios (each
# taken from two runs seconds apart, so less exposed to the host's drift).
#
# Knobs (environment): ROUNDS=3 DURATION=10 WARMUP=2 (seconds per run),
# CLIENTS=4 STREAMS=8 THREADS=1 (h2load), GOAL=0.8 (ratio ext_authz/own-API),
# STRICT=1 (fail below the goal), ARBITER_EXTRA_ARGS (more `arbiter serve`
# flags, e.g. `--decision-cache-size 0`).
#
# Exit status: 0 on success; 1 when a response is not an allow, or the goal
# is missed with STRICT=1; 2 on any other failure.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-4}
STREAMS=${STREAMS:-8}
THREADS=${THREADS:-1}
GOAL=${GOAL:-0.8}
STRICT=${STRICT:-0}

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
OWN_METHOD=/arbiter.v1.Authorizer/Check
EXT_METHOD=/envoy.service.auth.v3.Authorization/Check

need_tools h2load:nghttp2-client curl:curl

echo "building (release): arbiter, examples grpc_body and ext_authz_body" >&2
cargo build --release --quiet --bin arbiter --example grpc_body --example ext_authz_body
ARBITER=$TARGET/arbiter
BODYTOOL=$TARGET/examples/grpc_body
EXTTOOL=$TARGET/examples/ext_authz_body
for binary in "$ARBITER" "$BODYTOOL" "$EXTTOOL"; do
  [[ -x $binary ]] || fail "$binary was not built"
done

take_port PORT
take_port ADMIN_PORT

# The deployed example mapping, keys from the test fixtures, no Unix socket.
CONFIG=$WORK/arbiter.toml
sed -e "s|^jwks_url = .*|jwks_file = \"$ROOT/tests/fixtures/jwt/jwks-a.json\"|" \
  -e '/^listen_uds = /d' -e '/^uds_mode = /d' -e '/^listen = /d' \
  deploy/arbiter/ext-authz.toml >"$CONFIG"

EXTRA_ARGS=${ARBITER_EXTRA_ARGS:-}
clear_arbiter_env
# shellcheck disable=SC2086 # extra flags are meant to split
"$ARBITER" serve --config "$CONFIG" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" ${EXTRA_ARGS} >"$WORK/arbiter.log" 2>&1 &
PIDS+=($!)

OWN_BODY=$WORK/own.bin
EXT_BODY=$WORK/ext.bin
"$BODYTOOL" encode "$OWN_BODY"
"$EXTTOOL" encode "$EXT_BODY" tests/fixtures/jwt/rsa-1.pem

wait_ready "$ADMIN_PORT" "${PIDS[0]}" "$WORK/arbiter.log"

verify() {
  local name=$1 method=$2 body=$3 tool=$4
  curl -sS --http2-prior-knowledge --max-time 5 -X POST \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary "@$body" -D "$WORK/$name.headers" -o "$WORK/$name.response" \
    "http://127.0.0.1:$PORT$method" || not_ok "$name: the gRPC call failed"
  grep -qiE '^grpc-status: *0[[:space:]]*$' "$WORK/$name.headers" ||
    not_ok "$name: no grpc-status 0: $(tr -d '\r' <"$WORK/$name.headers" | tr '\n' ' ')"
  "$tool" decode "$WORK/$name.response" >"$WORK/$name.decoded" ||
    { cat "$WORK/$name.decoded" >&2; not_ok "$name: the answer is not an allow"; }
  echo "$name: grpc-status 0, allow" >&2
}
verify own "$OWN_METHOD" "$OWN_BODY" "$BODYTOOL"
verify ext_authz "$EXT_METHOD" "$EXT_BODY" "$EXTTOOL"

decisions() {
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v outcome="$1" '
    $1 ~ /^arbiter_decisions_total\{/ && index($1, "outcome=\"" outcome "\"") { sum += $2 }
    END { printf "%d\n", sum }'
}

# run_load NAME METHOD BODY ROUND: sets R_RPS, R_P50, R_P99 (us), R_SUCCEEDED.
run_load() {
  local name=$1 method=$2 body=$3 round=$4
  local out=$WORK/$name.$round.out log=$WORK/$name.$round.log
  h2load -D "$DURATION" --warm-up-time "$WARMUP" -c "$CLIENTS" -m "$STREAMS" -t "$THREADS" \
    -d "$body" -H 'content-type: application/grpc' -H 'te: trailers' \
    --log-file "$log" "http://127.0.0.1:$PORT$method" >"$out" 2>&1 ||
    { cat "$out" >&2; fail "h2load failed ($name)"; }
  local rps done succeeded failed errored timeout ok2xx
  rps=$(awk '/^finished in/ { sub(/,/, "", $4); print $4 }' "$out")
  read -r done succeeded failed errored timeout < <(awk '/^requests:/ {
    print $6, $8, $10, $12, $14 }' "$out")
  ok2xx=$(awk '/^status codes:/ { print $3 }' "$out")
  [[ -n $rps && -n $succeeded ]] || { cat "$out" >&2; fail "cannot read h2load's summary"; }
  if ((succeeded == 0 || failed + errored + timeout > 0 || done != succeeded ||
    ok2xx + CLIENTS * STREAMS < succeeded)); then
    cat "$out" >&2
    not_ok "$name: requests failed under load"
  fi
  local p50 p99
  read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '
    { v[NR] = $1 }
    function rank(p,   i) { i = int(p * NR); if (i < p * NR) i++; if (i < 1) i = 1; return v[i] }
    END { print rank(0.50), rank(0.99) }')
  R_RPS=$rps R_P50=$p50 R_P99=$p99 R_SUCCEEDED=$succeeded
}

# Every request of a run must be an allow (h2load only sees HTTP 200).
checked_load() {
  local before other_before after other_after
  before=$(decisions allow)
  other_before=$(($(decisions deny) + $(decisions invalid_request)))
  run_load "$@"
  after=$(decisions allow)
  other_after=$(($(decisions deny) + $(decisions invalid_request)))
  if ((other_after != other_before || after - before < R_SUCCEEDED)); then
    not_ok "$1: $((after - before)) allows and $((other_after - other_before))" \
      "other decisions for $R_SUCCEEDED successful requests"
  fi
}


echo "load: h2load -D ${DURATION}s (+${WARMUP}s warm-up) -c $CLIENTS -m $STREAMS -t $THREADS" \
  "= $((CLIENTS * STREAMS)) concurrent streams; $ROUNDS rounds alternating own-API, ext_authz;" \
  "$(nproc) cores" >&2
O_RPS=() O_P50=() O_P99=() X_RPS=() X_P50=() X_P99=() RATIOS=()
own_round() {
  checked_load own "$OWN_METHOD" "$OWN_BODY" "$1"
  O_RPS+=("$R_RPS") O_P50+=("$R_P50") O_P99+=("$R_P99")
  printf 'round %d  own-API    %10.0f req/s  p50 %6d us  p99 %6d us\n' \
    "$1" "$R_RPS" "$R_P50" "$R_P99" >&2
}
ext_round() {
  checked_load ext_authz "$EXT_METHOD" "$EXT_BODY" "$1"
  X_RPS+=("$R_RPS") X_P50+=("$R_P50") X_P99+=("$R_P99")
  printf 'round %d  ext_authz  %10.0f req/s  p50 %6d us  p99 %6d us\n' \
    "$1" "$R_RPS" "$R_P50" "$R_P99" >&2
}
# The order flips every round, so that the host's drift within a round
# (other guests on the cores) does not always fall on the same side.
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then
    own_round "$round"
    ext_round "$round"
  else
    ext_round "$round"
    own_round "$round"
  fi
  RATIOS+=("$(awk -v x="${X_RPS[-1]}" -v o="${O_RPS[-1]}" 'BEGIN { printf "%.3f", x / o }')")
  echo "round $round  ratio ${RATIOS[-1]}" >&2
done

o_rps=$(median "${O_RPS[@]}")
x_rps=$(median "${X_RPS[@]}")
ratio=$(awk -v x="$x_rps" -v o="$o_rps" 'BEGIN { printf "%.3f", x / o }')
echo
echo "median of $ROUNDS runs, $((CLIENTS * STREAMS)) concurrent streams ($CLIENTS connections x $STREAMS):"
printf '  %-10s %10s %10s %10s\n' api 'req/s' 'p50 (us)' 'p99 (us)'
printf '  %-10s %10.0f %10.0f %10.0f\n' own-API "$o_rps" "$(median "${O_P50[@]}")" "$(median "${O_P99[@]}")"
printf '  %-10s %10.0f %10.0f %10.0f\n' ext_authz "$x_rps" "$(median "${X_P50[@]}")" "$(median "${X_P99[@]}")"
echo "  throughput ratio ext_authz/own-API: $ratio (ratio of the medians; goal >= $GOAL)"
echo "  median of the rounds' ratios: $(median "${RATIOS[@]}") (per round: ${RATIOS[*]})"
if awk -v r="$ratio" -v g="$GOAL" 'BEGIN { exit !(r < g) }'; then
  echo "  below the goal" >&2
  [[ $STRICT == 1 ]] && exit 1
fi
exit 0
