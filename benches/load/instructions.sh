#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: deterministic
# on a shared, noisy machine where req/s is not (the same binary and inputs
# give the same counts whatever else runs). Complements the throughput
# benchmarks in this directory; kernel time (syscalls, TCP) is not counted.
#
# One release server under callgrind, `deploy/arbiter/ext-authz.toml` with
# the keys of `tests/fixtures/jwt/jwks-a.json` (decision log on, to stdout,
# which is redirected to a file), answers N own-API Checks, then N
# ext_authz Checks of the same decision (the bodies of `ext_authz.sh`);
# counters are zeroed after a warm-up and dumped after each phase. Prints
# the instructions per Check of each, how many of them decode the request
# message (`callgrind_annotate`, inclusive), and how much of what 0.8x
# allows ext_authz beyond the own API the decoding of Envoy's message takes.
#
#   bash benches/load/instructions.sh
#
# Knobs (environment): N=4000 (requests per phase), CONFIG_EXTRA (a TOML
# snippet appended to the config, e.g. '[decision_log]\nenabled = false'),
# KEEP=DIR (copy the callgrind dumps there, for callgrind_annotate).
set -euo pipefail

N=${N:-4000}
# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tools h2load:nghttp2-client valgrind:valgrind curl:curl
cargo build --release --quiet --bin arbiter --example grpc_body --example ext_authz_body

take_port PORT
take_port ADMIN
sed -e "s|^jwks_url = .*|jwks_file = \"$ROOT/tests/fixtures/jwt/jwks-a.json\"|" \
  -e '/^listen_uds = /d' -e '/^uds_mode = /d' -e '/^listen = /d' \
  deploy/arbiter/ext-authz.toml >"$WORK/arbiter.toml"
[[ -n ${CONFIG_EXTRA:-} ]] && printf '\n%b\n' "$CONFIG_EXTRA" >>"$WORK/arbiter.toml"
"$TARGET/examples/grpc_body" encode "$WORK/own.bin" >/dev/null
"$TARGET/examples/ext_authz_body" encode "$WORK/ext.bin" tests/fixtures/jwt/rsa-1.pem >/dev/null

clear_arbiter_env
valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
  "$TARGET/arbiter" serve --config "$WORK/arbiter.toml" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$ADMIN" >"$WORK/stdout.log" 2>"$WORK/stderr.log" &
VPID=$!
PIDS+=("$VPID")
# Under valgrind the server starts slowly: wait up to 2 minutes.
for _ in $(seq 600); do
  curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/ready" 2>/dev/null && break
  sleep 0.2
done
curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/ready" || { cat "$WORK/stderr.log" >&2; fail "not ready"; }

declare -A PER=() DECODE=()
for api in own ext_authz; do
  method=/arbiter.v1.Authorizer/Check body=$WORK/own.bin
  [[ $api == ext_authz ]] && method=/envoy.service.auth.v3.Authorization/Check body=$WORK/ext.bin
  load() {
    h2load -n "$1" -c 4 -m 8 -d "$body" -H 'content-type: application/grpc' -H 'te: trailers' \
      "http://127.0.0.1:$PORT$method"
  }
  load 200 >/dev/null
  sleep 1
  callgrind_control -z "$VPID" >/dev/null 2>&1
  out=$(load "$N")
  succeeded=$(awk '/^requests:/ { print $8 }' <<<"$out")
  [[ $succeeded == "$N" ]] || { echo "$out" >&2; echo "error: $api: $succeeded of $N succeeded" >&2; exit 2; }
  sleep 1
  callgrind_control -d "$api" "$VPID" >/dev/null 2>&1
  dump=$(ls -t "$WORK"/cg.out.* | head -1)
  total=$(awk '/^summary:/ { print $2 }' "$dump")
  PER[$api]=$((total / N))
  [[ -n ${KEEP:-} ]] && mkdir -p "$KEEP" && cp "$dump" "$KEEP/callgrind.$api.out"
  # Reading the request message, inclusive: prost through tonic's codec
  # (own API), or the in-place view of Envoy's message (ext_authz,
  # `src/adapter/ext_authz/wire.rs`).
  decode=$(callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null |
    awk '!found && (/ProstDecoder<.*as tonic::codec::Decoder>::decode/ || /wire::CheckView::parse( \[|$)/) {
      gsub(/,/, "", $1); print $1; found = 1 }')
  DECODE[$api]=$((${decode:-0} / N))
  printf '%-10s %12d instructions for %d Checks: %8d per Check, %6d of them decoding the request\n' \
    "$api" "$total" "$N" "${PER[$api]}" "${DECODE[$api]}"
done
awk -v a="${PER[own]}" -v b="${PER[ext_authz]}" \
  'BEGIN { printf "ext_authz / own-API instructions per Check: %.3f (own-API/ext_authz %.3f)\n", b / a, a / b }'
# What 0.8x leaves ext_authz beyond the own API, and how much of it the
# reading of the request alone takes.
awk -v a="${PER[own]}" -v da="${DECODE[own]}" -v db="${DECODE[ext_authz]}" 'BEGIN {
  budget = a / 0.8 - a
  printf "at 0.8x, ext_authz may cost %d more than the own API; reading its request costs %d more (%.0f%% of that)\n",
    budget, db - da, 100 * (db - da) / budget }'
