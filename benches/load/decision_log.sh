#!/usr/bin/env bash
# Load benchmark of decision logging: the RELEASE Arbiter server under the
# same h2load load (gRPC unary Check over h2c, as in run.sh) in three modes,
# run side by side in one run, in alternating rounds (off, nats, nats-down,
# off, ...):
#
#   off        `[decision_log] enabled = false`
#   nats       every decision logged to NATS JetStream (a nats-server this
#              script starts on a free port, with a temp store)
#   nats-down  the NATS sink points at a port nobody listens on: every
#              record goes to the on-disk spool and waits there
#
# Every mode serves the same policies with the same decision cache, so the
# comparison is fair; CACHE_SIZES runs the whole comparison once per size
# ("default" = the server's default, 0 = no cache: full Cedar evaluation).
# Prints req/s, p50 and p99 per mode and the ratios nats/off (goal >= 0.93)
# and nats-down/off (goal >= 0.85); each round also prints the CPU ticks the
# server and the nats-server process used (they share the machine's cores),
# and the summary the CPU time per 1,000 requests of the server, of
# nats-server and of the whole machine (h2load, kernel writeback and other
# guests' noise included) over all rounds: on a saturated machine the
# throughput ratio follows the whole machine's CPU per request.
#
#   bash benches/load/decision_log.sh
#
# Knobs (environment): ROUNDS=3 DURATION=8 WARMUP=2 CLIENTS=4 STREAMS=8
# THREADS=1 CACHE_SIZES="default 0" STRICT=1 (exit 1 below a goal)
# SPOOL_MAX_BYTES=8589934592 (the spool cap of the nats modes; needs that
# much free space in $TMPDIR at ~50k req/s), NATS_SINK_EXTRA (more keys for
# the NATS sink, e.g. 'records_per_message = 1').
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-4}
STREAMS=${STREAMS:-8}
THREADS=${THREADS:-1}
CACHE_SIZES=${CACHE_SIZES:-default 0}
STRICT=${STRICT:-0}
# Large enough that nats-down spools every record of the run (no drops).
SPOOL_MAX_BYTES=${SPOOL_MAX_BYTES:-8589934592}
NATS_SINK_EXTRA=${NATS_SINK_EXTRA:-}
GOAL_NATS=0.93
GOAL_DOWN=0.85

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
METHOD=/arbiter.v1.Authorizer/Check

need_tools h2load:nghttp2-client curl:curl
NATS_SERVER=/usr/sbin/nats-server
if [[ ! -x $NATS_SERVER ]]; then
  need_tools nats-server:nats-server
  NATS_SERVER=$(command -v nats-server)
fi

echo "building (release): arbiter, example grpc_body" >&2
cargo build --release --quiet --bin arbiter --example grpc_body
ARBITER=$TARGET/arbiter
BODYTOOL=$TARGET/examples/grpc_body

clear_arbiter_env

BODY=$WORK/check_request.bin
"$BODYTOOL" encode "$BODY"

# Busy ticks of the whole machine (every CPU; not idle, iowait or steal,
# the time the hypervisor gave other guests).
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
TICKS_PER_SECOND=$(getconf CLK_TCK)

metric() { # metric ADMIN_PORT NAME_PREFIX: sum of matching samples
  curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" 'index($1, m) == 1 { s += $2 } END { printf "%d\n", s }'
}

run_load() { # run_load PORT NAME: sets R_RPS R_P50 R_P99, and R_MACHINE_TICKS
  local port=$1 name=$2 out=$WORK/$2.out log=$WORK/$2.log machine0
  machine0=$(machine_ticks)
  h2load -D "$DURATION" --warm-up-time "$WARMUP" -c "$CLIENTS" -m "$STREAMS" -t "$THREADS" \
    -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
    --log-file "$log" "http://127.0.0.1:$port$METHOD" >"$out" 2>&1 ||
    { cat "$out" >&2; fail "h2load failed against $name"; }
  # The machine's busy time of the load alone (not of the sort below).
  R_MACHINE_TICKS=$(($(machine_ticks) - machine0))
  local failed
  R_RPS=$(awk '/^finished in/ { sub(/,/, "", $4); print $4 }' "$out")
  failed=$(awk '/^requests:/ { print $10 + $12 + $14 }' "$out")
  [[ -n $R_RPS && $failed == 0 ]] || { cat "$out" >&2; fail "$name: requests failed under load"; }
  read -r R_P50 R_P99 < <(cut -f3 "$log" | sort -n | awk '
    { v[NR] = $1 }
    function rank(p,   i) { i = int(p * NR); if (i < p * NR) i++; if (i < 1) i = 1; return v[i] }
    END { print rank(0.50), rank(0.99) }')
}

take_port NATS_PORT
take_port DEAD_PORT
mkdir -p "$WORK/nats"
"$NATS_SERVER" -js -sd "$WORK/nats" -p "$NATS_PORT" -a 127.0.0.1 >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
LONG_PIDS+=("$NATS_PID")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done

config() { # config MODE -> TOML path
  local mode=$1 file=$WORK/$1.toml
  case $mode in
    off) printf '[decision_log]\nenabled = false\n' >"$file" ;;
    nats | nats-down)
      local port=$NATS_PORT
      [[ $mode == nats-down ]] && port=$DEAD_PORT
      printf '[decision_log]\nspool_dir = "%s"\nspool_max_bytes = %s\n\n[[decision_log.sinks]]\ntype = "nats"\nurl = "nats://127.0.0.1:%s"\nsubject = "bench.decisions"\nstream = "BENCH"\n%b\n' \
        "$WORK/spool-$mode-$RANDOM" "$SPOOL_MAX_BYTES" "$port" "$NATS_SINK_EXTRA" >"$file"
      ;;
  esac
  echo "$file"
}

MODES=(off nats nats-down)
SUMMARY=()
status=0
for cache in $CACHE_SIZES; do
  declare -A GRPC=() ADMIN=() SERVER_PID=()
  cache_args=()
  [[ $cache != default ]] && cache_args=(--decision-cache-size "$cache")
  for mode in "${MODES[@]}"; do
    take_port "GRPC[$mode]"
    take_port "ADMIN[$mode]"
    "$ARBITER" serve --config "$(config "$mode")" --listen "127.0.0.1:${GRPC[$mode]}" \
      --admin-listen "127.0.0.1:${ADMIN[$mode]}" "${cache_args[@]}" \
      >/dev/null 2>"$WORK/arbiter-$mode.log" &
    PIDS+=($!)
    SERVER_PID[$mode]=$!
  done
  for mode in "${MODES[@]}"; do
    wait_ready "${ADMIN[$mode]}" "${SERVER_PID[$mode]}" "$WORK/arbiter-$mode.log"
  done
  echo "cache $cache: h2load -D ${DURATION}s (+${WARMUP}s) -c $CLIENTS -m $STREAMS; $ROUNDS rounds of ${MODES[*]}; $(nproc) cores" >&2
  declare -A RPS=() P50=() P99=() SERVER_T=() NATS_T=() MACHINE_T=() REQUESTS=()
  for round in $(seq "$ROUNDS"); do
    for mode in "${MODES[@]}"; do
      server0=$(cpu_ticks "${SERVER_PID[$mode]}") nats0=$(cpu_ticks "$NATS_PID")
      run_load "${GRPC[$mode]}" "$mode"
      server_ticks=$(($(cpu_ticks "${SERVER_PID[$mode]}") - server0))
      nats_ticks=$(($(cpu_ticks "$NATS_PID") - nats0))
      RPS[$mode]+="$R_RPS " P50[$mode]+="$R_P50 " P99[$mode]+="$R_P99 "
      # The ticks cover the warm-up too: requests over both (the rate of
      # the measured part times their length), the same for every mode.
      SERVER_T[$mode]=$((${SERVER_T[$mode]:-0} + server_ticks))
      NATS_T[$mode]=$((${NATS_T[$mode]:-0} + nats_ticks))
      MACHINE_T[$mode]=$((${MACHINE_T[$mode]:-0} + R_MACHINE_TICKS))
      REQUESTS[$mode]=$(awk -v r="${REQUESTS[$mode]:-0}" -v x="$R_RPS" -v d=$((DURATION + WARMUP)) 'BEGIN { printf "%.0f", r + x * d }')
      printf 'cache %-7s round %d  %-9s %9.0f req/s  p50 %6d us  p99 %6d us  CPU ticks: server %5d, nats-server %5d\n' \
        "$cache" "$round" "$mode" "$R_RPS" "$R_P50" "$R_P99" "$server_ticks" "$nats_ticks" >&2
    done
  done
  # shellcheck disable=SC2086
  off=$(median ${RPS[off]})
  echo
  echo "decision cache: $cache; median of $ROUNDS rounds, $((CLIENTS * STREAMS)) concurrent streams"
  printf '  %-10s %10s %9s %9s %8s %12s %10s %26s\n' mode 'req/s' 'p50 us' 'p99 us' ratio delivered dropped \
    'CPU ms/1k req: srv nats all'
  machine_off=$(awk -v t="${MACHINE_T[off]}" -v n="${REQUESTS[off]}" 'BEGIN { print t / n }')
  for mode in "${MODES[@]}"; do
    # shellcheck disable=SC2086
    rps=$(median ${RPS[$mode]})
    ratio=$(awk -v a="$rps" -v b="$off" 'BEGIN { printf "%.3f", a / b }')
    delivered=$(metric "${ADMIN[$mode]}" arbiter_decision_log_delivered_total)
    dropped=$(metric "${ADMIN[$mode]}" arbiter_decision_log_dropped_total)
    spooled=$(metric "${ADMIN[$mode]}" arbiter_decision_log_spooled_total)
    cpu=$(awk -v s="${SERVER_T[$mode]}" -v a="${NATS_T[$mode]}" -v m="${MACHINE_T[$mode]}" \
      -v n="${REQUESTS[$mode]}" -v hz="$TICKS_PER_SECOND" -v off="$machine_off" \
      'BEGIN { k = 1e6 / hz / n; printf "%6.3f %5.3f %6.3f (%.2fx)", s * k, a * k, m * k, m / n / off }')
    # shellcheck disable=SC2086
    printf '  %-10s %10.0f %9.0f %9.0f %8s %12s %10s %26s\n' "$mode" "$rps" "$(median ${P50[$mode]})" \
      "$(median ${P99[$mode]})" "$ratio" "$delivered/$spooled" "$dropped" "$cpu"
    goal=
    [[ $mode == nats ]] && goal=$GOAL_NATS
    [[ $mode == nats-down ]] && goal=$GOAL_DOWN
    if [[ -n $goal ]]; then
      if awk -v r="$ratio" -v g="$goal" 'BEGIN { exit !(r < g) }'; then
        SUMMARY+=("cache $cache: $mode/off = $ratio, below the goal $goal")
        status=1
      else
        SUMMARY+=("cache $cache: $mode/off = $ratio (goal >= $goal)")
      fi
    fi
  done
  stop_pids "${PIDS[@]}"
  PIDS=()
done
stop_pids "$NATS_PID"
LONG_PIDS=()
echo
printf '%s\n' "${SUMMARY[@]}"
[[ $STRICT == 1 ]] && exit "$status"
exit 0
