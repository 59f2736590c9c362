#!/usr/bin/env bash
# Chaos run (issue 22, point 6): the RELEASE Arbiter under steady, varied
# gRPC load while its dependencies fail on a schedule; every answer is
# checked against an oracle and every decision record is looked for in NATS.
#
#   sudo bash benches/chaos/run.sh        (root: it runs its own PostgreSQL
#                                          as `postgres` and mounts a tmpfs)
#
# It starts its own PostgreSQL (initdb into a temp dir, its own port, run as
# `postgres` with runuser; never the machine's shared one), its own
# `nats-server -js`, a TCP proxy between Arbiter and Postgres that can delay
# traffic (the slow identity store), a spool on a small tmpfs, and a policy
# directory that `chaos_load run` rewrites (one version in five broken).
# Arbiter: 127.0.0.1, Postgres identity sync through the proxy, decision log
# to NATS JetStream with the spool, policy watch every 50 ms.
#
# Phases (each starts with its fault; the label lasts until the next one):
#   baseline      nothing
#   pg-restart    PostgreSQL stopped (fast) for PG_DOWN s, then started
#   nats-kill     nats-server kill -9 for NATS_DOWN s, then restarted (same store)
#   pg-slow       the proxy holds every chunk SLOW_MS ms for SLOW_SECS s
#   policy-churn  a new policy version every 100 ms for CHURN_SECS s, 1 in 5 broken
#                 (1 per second the rest of the run)
#   sighup        kill -HUP
#   disk-full     the spool's tmpfs filled for FULL_SECS s, then freed
#   sigterm       kill -TERM; the load goes on until the process has exited
# Then Arbiter is started once more on the same spool to deliver what the
# spool still held (documented: delivered at the next start), and
# `chaos_load report` prints the table. Exit 1 when a goal is missed.
#
# Knobs: CONCURRENCY=8 RATE=300 (calls/s) SETTLE=10 PG_DOWN=6 NATS_DOWN=8
# SLOW_MS=1500 SLOW_SECS=12 CHURN_SECS=15 FULL_SECS=8 MAX_STALENESS=3
# SPOOL_FS_MB=48 KEEP=1 (keep the work dir) PROFILE=debug (try the script)
set -euo pipefail

CONCURRENCY=${CONCURRENCY:-8}
RATE=${RATE:-300}
SETTLE=${SETTLE:-10}
PG_DOWN=${PG_DOWN:-6}
NATS_DOWN=${NATS_DOWN:-8}
SLOW_MS=${SLOW_MS:-1500}
SLOW_SECS=${SLOW_SECS:-12}
CHURN_SECS=${CHURN_SECS:-15}
FULL_SECS=${FULL_SECS:-8}
MAX_STALENESS=${MAX_STALENESS:-3}
SPOOL_FS_MB=${SPOOL_FS_MB:-48}
KEEP=${KEEP:-0}
PROFILE=${PROFILE:-release}

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../load/lib.sh"

need_tools curl:curl jq:jq psql:postgresql-client
NATS_SERVER=/usr/sbin/nats-server
[[ -x $NATS_SERVER ]] || NATS_SERVER=$(command -v nats-server)
PG_BIN=$(dirname "$(command -v pg_ctl)")
[[ $(id -u) == 0 ]] || fail "run as root (runuser postgres, mount tmpfs)"

if [[ $PROFILE == release ]]; then
  echo "building (release): arbiter, example chaos_load" >&2
  nice cargo build --release --quiet --bin arbiter --example chaos_load
else # a quick try of the script itself on debug binaries
  nice cargo build --quiet --bin arbiter --example chaos_load
  TARGET=$(dirname "$TARGET")/debug
fi
ARBITER=$TARGET/arbiter
TOOL=$TARGET/examples/chaos_load
clear_arbiter_env

now_ms() { date +%s%3N; }
OUT=$WORK/out
CONTROL=$WORK/control
POLICIES=$WORK/policies
mkdir -p "$OUT" "$CONTROL" "$POLICIES"
chmod 755 "$WORK"
phase() {
  printf '%s\t%s\n' "$(now_ms)" "$1" >>"$OUT/phases.tsv"
  echo "$(date -u +%T) phase $1" >&2
}
recovered() { # recovered PHASE TEXT
  printf '%s\t%s\n' "$1" "$2" >>"$OUT/recovery.tsv"
  echo "$(date -u +%T)   $1: $2" >&2
}

# ---- PostgreSQL, our own
take_port PG_PORT
PGDATA=$WORK/pgdata
mkdir -p "$PGDATA" "$WORK/pgrun"
chown postgres:postgres "$PGDATA" "$WORK/pgrun"
runuser -u postgres -- "$PG_BIN/initdb" -D "$PGDATA" -A trust -U postgres >"$WORK/initdb.log" 2>&1 ||
  { cat "$WORK/initdb.log" >&2; fail "initdb"; }
pg() { runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$WORK/pgrun/pg.log" -w "$@" >/dev/null; }
PG_OPTS="-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK/pgrun"
pg -o "$PG_OPTS" start
# Stopped on exit even when the script fails (pg_ctl forks; no pid to track).
trap 'pg stop -m immediate 2>/dev/null || true; umount "$WORK/spoolfs" 2>/dev/null || true; [[ $KEEP == 1 ]] && echo "kept $WORK" >&2 && WORK=/nonexistent; cleanup' EXIT
PSQL=(psql -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
"${PSQL[@]}" -c 'CREATE DATABASE chaos'
"${PSQL[@]}" -d chaos -f deploy/postgres/schema.sql >/dev/null
"${PSQL[@]}" -d chaos -c "INSERT INTO tenants (id, name) VALUES ('t1', 'T1');
  INSERT INTO users (id, tenant_id, email, attributes)
  SELECT 'u' || n, 't1', 'u' || n || '@t1', jsonb_build_object('level', n % 10)
  FROM generate_series(0, 199) AS n;"
max_seq() { "${PSQL[@]}" -d chaos -tA -c 'SELECT coalesce(max(seq), 0) FROM arbiter_change_log'; }

# ---- the slow-store proxy
take_port PROXY_PORT
echo 0 >"$CONTROL/delay_ms"
"$TOOL" proxy "127.0.0.1:$PROXY_PORT" "127.0.0.1:$PG_PORT" "$CONTROL/delay_ms" 2>"$WORK/proxy.log" &
LONG_PIDS+=($!)

# ---- NATS
take_port NATS_PORT
mkdir -p "$WORK/nats"
start_nats() {
  "$NATS_SERVER" -js -sd "$WORK/nats" -p "$NATS_PORT" -a 127.0.0.1 >>"$WORK/nats.log" 2>&1 &
  NATS_PID=$!
  LONG_PIDS+=("$NATS_PID")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && return; sleep 0.1; done
  fail "nats-server did not start"
}
start_nats

# ---- the spool's disk
mkdir -p "$WORK/spoolfs"
if mount -t tmpfs -o "size=${SPOOL_FS_MB}m" tmpfs "$WORK/spoolfs"; then
  SPOOL_FS="tmpfs ${SPOOL_FS_MB} MiB"
else
  fail "cannot mount a tmpfs for the spool (needs root / CAP_SYS_ADMIN)"
fi
SPOOL=$WORK/spoolfs/spool

# ---- Arbiter
"$TOOL" policy "$POLICIES" 1
take_port GRPC_PORT
take_port ADMIN_PORT
cat >"$WORK/arbiter.toml" <<TOML
policies = "policies"

[identity]
max_staleness_secs = $MAX_STALENESS

[identity.postgres]
url = "postgres://postgres@127.0.0.1:$PROXY_PORT/chaos?sslmode=disable"
poll_interval_ms = 200

[decision_log]
spool_dir = "$SPOOL"
segment_bytes = 4194304

[[decision_log.sinks]]
type = "nats"
url = "nats://127.0.0.1:$NATS_PORT"
subject = "chaos.decisions"
stream = "CHAOS"
TOML
start_arbiter() { # start_arbiter LOG
  "$ARBITER" serve --config "$WORK/arbiter.toml" --listen "127.0.0.1:$GRPC_PORT" \
    --admin-listen "127.0.0.1:$ADMIN_PORT" --reload-interval-ms 50 >/dev/null 2>>"$1" &
  ARBITER_PID=$!
  PIDS+=("$ARBITER_PID")
  wait_ready "$ADMIN_PORT" "$ARBITER_PID" "$1"
}
start_arbiter "$WORK/arbiter.log"

metrics() { curl -fsS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null || true; }
metric() { # metric PREFIX: sum of the samples whose name (with labels) starts so
  metrics | awk -v m="$1" 'index($1, m) == 1 { s += $2 } END { printf "%d\n", s }'
}
ready_json() { curl -sS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/ready" 2>/dev/null || echo '{}'; }

# RSS and open descriptors of Arbiter every 500 ms.
(
  while kill -0 "$ARBITER_PID" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$ARBITER_PID/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$ARBITER_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    printf '%s\t%s\t%s\n' "$(now_ms)" "${rss:-0}" "$fds" >>"$OUT/samples.tsv"
    sleep 0.5
  done
) &
SAMPLER_PID=$!
PIDS+=("$SAMPLER_PID")

# ---- recovery probes (each prints the ms since $1, or "not within ...")
until_identity_caught_up() { # START_MS: /ready fresh and applied >= the source's max(seq) at START
  local start=$1 target
  target=$(max_seq)
  for _ in $(seq 600); do
    if ready_json | jq -e --argjson t "$target" '.identity.fresh == true and .identity.applied_position >= $t' >/dev/null; then
      echo "caught up (seq $target) after $(($(now_ms) - start)) ms"
      return
    fi
    sleep 0.1
  done
  echo "not caught up within 60 s"
}
until_delivered() { # START_MS: every record spooled by START delivered to NATS
  local start=$1 target
  target=$(metric arbiter_decision_log_spooled_total)
  for _ in $(seq 600); do
    if (($(metric 'arbiter_decision_log_delivered_total{sink="nats"') >= target)); then
      echo "spool delivered (to record $target) after $(($(now_ms) - start)) ms"
      return
    fi
    sleep 0.1
  done
  echo "spool not delivered within 60 s"
}
settle_until() { # END_MS
  while (($(now_ms) < $1)); do sleep 0.2; done
}

# ---- load
echo 1000 >"$CONTROL/policy_interval_ms"
"$TOOL" run "127.0.0.1:$GRPC_PORT" "postgres://postgres@127.0.0.1:$PG_PORT/chaos?sslmode=disable" \
  "$POLICIES" "$CONTROL" "$OUT" "$CONCURRENCY" "$RATE" 2>"$WORK/load.log" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
echo "load: $CONCURRENCY callers, $RATE calls/s; arbiter pid $ARBITER_PID; spool on $SPOOL_FS" >&2

phase baseline
sleep "$SETTLE"

phase pg-restart
t=$(now_ms)
pg stop -m fast
sleep "$PG_DOWN"
pg -o "$PG_OPTS" start
recovered pg-restart "$(until_identity_caught_up "$(now_ms)")"
settle_until $((t + (PG_DOWN + SETTLE) * 1000))

phase nats-kill
t=$(now_ms)
kill -KILL "$NATS_PID"
wait "$NATS_PID" 2>/dev/null || true
sleep "$NATS_DOWN"
start_nats
recovered nats-kill "$(until_delivered "$(now_ms)")"
settle_until $((t + (NATS_DOWN + SETTLE) * 1000))

phase pg-slow
t=$(now_ms)
echo "$SLOW_MS" >"$CONTROL/delay_ms"
sleep "$SLOW_SECS"
echo 0 >"$CONTROL/delay_ms"
recovered pg-slow "$(until_identity_caught_up "$(now_ms)")"
settle_until $((t + (SLOW_SECS + SETTLE) * 1000))

phase policy-churn
echo 100 >"$CONTROL/policy_interval_ms"
sleep "$CHURN_SECS"
echo 1000 >"$CONTROL/policy_interval_ms"
sleep 2

phase sighup
t=$(now_ms)
kill -HUP "$ARBITER_PID"
sleep 1
if kill -0 "$ARBITER_PID" 2>/dev/null && curl -fsS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null; then
  recovered sighup "still serving, /ready 200"
else
  recovered sighup "PROCESS GONE after SIGHUP"
fi
settle_until $((t + SETTLE * 1000))

phase disk-full
t=$(now_ms)
# Kept full: whatever the spool frees (delivered segments) is taken again.
i=0
while (($(now_ms) < t + FULL_SECS * 1000)); do
  dd if=/dev/zero of="$WORK/spoolfs/filler.$i" bs=64k 2>/dev/null || true
  i=$((i + 1))
  sleep 0.2
done
df -h "$WORK/spoolfs" | tail -1 >&2
rm -f "$WORK/spoolfs"/filler.*
recovered disk-full "$(until_delivered "$(now_ms)")"
settle_until $((t + (FULL_SECS + SETTLE) * 1000))

DROPS=$(metrics | grep '^arbiter_decision_log_dropped_total' | grep -v ' 0$' | tr '\n' ' ' || true)
DROPPED=$(metric arbiter_decision_log_dropped_total)
phase sigterm
t=$(now_ms)
kill -TERM "$ARBITER_PID"
code=0
wait "$ARBITER_PID" || code=$?
recovered sigterm "exit $code after $(($(now_ms) - t)) ms"
sleep 1
touch "$CONTROL/stop"
wait "$LOAD_PID" || fail "the load generator failed: $(tail -5 "$WORK/load.log")"
wait "$SAMPLER_PID" 2>/dev/null || true

# ---- what the spool still held: delivered at the next start
phase drain
before=$("$TOOL" report "$OUT" "nats://127.0.0.1:$NATS_PORT" CHAOS $((MAX_STALENESS * 1000)) 2>/dev/null | grep -o 'records in the stream [0-9]*' || true)
# (The load's last policy version may be a broken one: a start refuses it.)
"$TOOL" policy "$POLICIES" 1
start_arbiter "$WORK/arbiter-drain.log"
for _ in $(seq 300); do
  lag=$(metric 'arbiter_decision_log_sink_lag{sink="nats"')
  ((lag == 0)) && break
  sleep 0.1
done
kill -TERM "$ARBITER_PID"
wait "$ARBITER_PID" || true

echo >&2
echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); spool: $SPOOL_FS; load: $CONCURRENCY callers, $RATE calls/s; max_staleness_secs $MAX_STALENESS"
echo "decision-log drops counted before SIGTERM (documented: arbiter_decision_log_dropped_total): ${DROPS:-none}"
echo "NATS before the drain restart: ${before:-?}"
status=0
"$TOOL" report "$OUT" "nats://127.0.0.1:$NATS_PORT" CHAOS $((MAX_STALENESS * 1000)) "$DROPPED" || status=$?
exit "$status"
