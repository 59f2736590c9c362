#!/usr/bin/env bash
# The cost of decision logging in server CPU: microseconds of the Arbiter
# process's CPU time (user + system, all threads, from /proc/<pid>/stat)
# per logged decision,
#
#   (CPU_on - CPU_off) / requests
#
# measured side by side in one run: one RELEASE server per mode, the same
# h2load load (gRPC unary Check over h2c, as in run.sh, exactly REQUESTS
# requests a run) against each in turn, in alternating rounds (off, spool,
# nats, off, ...):
#
#   off    `[decision_log] enabled = false`
#   spool  the NATS sink points at a port nobody listens on: every record
#          is redacted, encoded and written to the on-disk spool (the file)
#          and waits there
#   nats   every record spooled and delivered to NATS JetStream (a
#          nats-server this script starts on a free port, with a temp store)
#   file   (only if named in MODES) spooled and delivered to a `file` sink
#
# Every mode serves the same policies with the same decision cache. The
# nats-server's CPU is counted separately (it is not Arbiter's) and printed
# per decision too. Each round pairs a logged mode with that round's `off`;
# the summary prints, per mode, the median over the rounds of
# (CPU_mode - CPU_off) / REQUESTS, the lowest and highest round, and req/s
# as a ratio to off.
#
#   bash benches/load/decision_log.sh
#
# Knobs (environment): ROUNDS=5 REQUESTS=200000 WARMUP_REQUESTS=20000
# CLIENTS=4 STREAMS=8 THREADS=1 RATE (total req/s; unset = as fast as the
# server answers) MODES="off spool nats" CACHE_SIZES=default (0 = no decision
# cache: full Cedar evaluation) GOAL_US=2 STRICT=1 (exit 1 above the goal)
# SPOOL_MAX_BYTES=8589934592 (the spool cap; `spool` keeps every record of
# the run), NATS_SINK_EXTRA (more keys for the NATS sink, e.g.
# 'records_per_message = 1'), ARBITER (another server binary, e.g. one
# built from an earlier commit, to measure it with the same script).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
REQUESTS=${REQUESTS:-200000}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-20000}
CLIENTS=${CLIENTS:-4}
STREAMS=${STREAMS:-8}
THREADS=${THREADS:-1}
RATE=${RATE:-}
read -r -a MODES <<<"${MODES:-off spool nats}"
CACHE_SIZES=${CACHE_SIZES:-default}
GOAL_US=${GOAL_US:-2}
STRICT=${STRICT:-0}
SPOOL_MAX_BYTES=${SPOOL_MAX_BYTES:-8589934592}
NATS_SINK_EXTRA=${NATS_SINK_EXTRA:-}
[[ ${MODES[0]} == off ]] || { echo "MODES must start with off" >&2; exit 2; }

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
ARBITER=${ARBITER:-$TARGET/arbiter}
BODYTOOL=$TARGET/examples/grpc_body
echo "server: $ARBITER" >&2

clear_arbiter_env

BODY=$WORK/check_request.bin
"$BODYTOOL" encode "$BODY"
HZ=$(getconf CLK_TCK)

metric() { # metric ADMIN_PORT NAME_PREFIX: sum of matching samples
  curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" 'index($1, m) == 1 { s += $2 } END { printf "%d\n", s }'
}

load() { # load PORT NAME COUNT: COUNT requests; sets R_RPS
  local port=$1 name=$2 count=$3 out=$WORK/$2.out rate=()
  [[ -n $RATE ]] && rate=(--rps "$((RATE / CLIENTS))")
  h2load -n "$count" -c "$CLIENTS" -m "$STREAMS" -t "$THREADS" "${rate[@]}" \
    -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$port$METHOD" >"$out" 2>&1 ||
    { cat "$out" >&2; fail "h2load failed against $name"; }
  local succeeded
  R_RPS=$(awk '/^finished in/ { sub(/,/, "", $4); print $4 }' "$out")
  succeeded=$(awk '/^requests:/ { print $8 }' "$out")
  [[ -n $R_RPS && $succeeded == "$count" ]] || { cat "$out" >&2; fail "$name: requests failed under load"; }
}

take_port NATS_PORT
take_port DEAD_PORT
mkdir -p "$WORK/nats"
"$NATS_SERVER" -js -sd "$WORK/nats" -p "$NATS_PORT" -a 127.0.0.1 >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
LONG_PIDS+=("$NATS_PID")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done

config() { # config MODE -> TOML path
  local mode=$1 file=$WORK/$1.toml spool=$WORK/spool-$1-$RANDOM
  local head='[decision_log]\nspool_dir = "%s"\nspool_max_bytes = %s\n\n[[decision_log.sinks]]\n'
  case $mode in
    off) printf '[decision_log]\nenabled = false\n' >"$file" ;;
    spool | nats)
      local port=$NATS_PORT
      [[ $mode == spool ]] && port=$DEAD_PORT
      printf "$head"'type = "nats"\nurl = "nats://127.0.0.1:%s"\nsubject = "bench.decisions"\nstream = "BENCH"\n%b\n' \
        "$spool" "$SPOOL_MAX_BYTES" "$port" "$NATS_SINK_EXTRA" >"$file"
      ;;
    file) printf "$head"'type = "file"\npath = "%s"\n' "$spool" "$SPOOL_MAX_BYTES" "$WORK/decisions-$RANDOM.jsonl" >"$file" ;;
    *) fail "unknown mode $mode" ;;
  esac
  echo "$file"
}

# µs per request from clock ticks.
per_request_us() { awk -v t="$1" -v n="$REQUESTS" -v hz="$HZ" 'BEGIN { printf "%.3f", t * 1e6 / hz / n }'; }

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
  echo "cache $cache: h2load -n $REQUESTS (after $WARMUP_REQUESTS) -c $CLIENTS -m $STREAMS${RATE:+ at $RATE req/s}; $ROUNDS rounds of ${MODES[*]}; $(nproc) cores" >&2
  declare -A RPS=() SERVER_US=() NATS_US=() EXTRA_US=()
  for round in $(seq "$ROUNDS"); do
    for mode in "${MODES[@]}"; do
      load "${GRPC[$mode]}" "$mode" "$WARMUP_REQUESTS"
      server0=$(cpu_ticks "${SERVER_PID[$mode]}") nats0=$(cpu_ticks "$NATS_PID")
      load "${GRPC[$mode]}" "$mode" "$REQUESTS"
      server=$(per_request_us $(($(cpu_ticks "${SERVER_PID[$mode]}") - server0)))
      nats=$(per_request_us $(($(cpu_ticks "$NATS_PID") - nats0)))
      RPS[$mode]+="$R_RPS " SERVER_US[$mode]+="$server " NATS_US[$mode]+="$nats "
      extra=
      if [[ $mode == off ]]; then
        off_us=$server
      else
        extra=$(awk -v a="$server" -v b="$off_us" 'BEGIN { printf "%.3f", a - b }')
        EXTRA_US[$mode]+="$extra "
      fi
      printf 'cache %-7s round %d  %-5s %8.0f req/s  Arbiter CPU %6.2f us/req%s  nats-server %5.2f us/req\n' \
        "$cache" "$round" "$mode" "$R_RPS" "$server" "${extra:+ (+$extra vs off)}" "$nats" >&2
    done
  done
  echo
  echo "decision cache: $cache; $ROUNDS rounds of $REQUESTS requests, $((CLIENTS * STREAMS)) concurrent streams${RATE:+, $RATE req/s}; medians over rounds"
  printf '  %-6s %9s %6s %10s %22s %10s %14s %8s\n' mode 'req/s' ratio 'CPU us/req' 'logging us/decision' 'min..max' 'nats-server us' dropped
  # shellcheck disable=SC2086
  off_rps=$(median ${RPS[off]})
  for mode in "${MODES[@]}"; do
    # shellcheck disable=SC2086
    rps=$(median ${RPS[$mode]}) cpu=$(median ${SERVER_US[$mode]}) nats=$(median ${NATS_US[$mode]})
    ratio=$(awk -v a="$rps" -v b="$off_rps" 'BEGIN { printf "%.3f", a / b }')
    dropped=$(metric "${ADMIN[$mode]}" arbiter_decision_log_dropped_total)
    if [[ $mode == off ]]; then
      printf '  %-6s %9.0f %6s %10.2f %22s %10s %14.2f %8s\n' "$mode" "$rps" "$ratio" "$cpu" - - "$nats" -
      continue
    fi
    # shellcheck disable=SC2086
    extra=$(median ${EXTRA_US[$mode]})
    range=$(printf '%s\n' ${EXTRA_US[$mode]} | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f..%.2f", lo, hi }')
    printf '  %-6s %9.0f %6s %10.2f %22.2f %10s %14.2f %8s\n' "$mode" "$rps" "$ratio" "$cpu" "$extra" "$range" "$nats" "$dropped"
    if awk -v x="$extra" -v g="$GOAL_US" 'BEGIN { exit !(x > g) }'; then
      SUMMARY+=("cache $cache: $mode costs $extra us of Arbiter CPU per decision, above the goal $GOAL_US")
      status=1
    else
      SUMMARY+=("cache $cache: $mode costs $extra us of Arbiter CPU per decision (goal <= $GOAL_US)")
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
