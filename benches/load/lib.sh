# Shared plumbing of the load benchmarks in this directory; sourced, not run.
# After `source lib.sh`: the repository root is the working directory,
# $TARGET is the release output folder, $WORK a temporary folder, and every
# pid pushed onto PIDS or LONG_PIDS is stopped (TERM, then KILL after 5 s) on
# exit; a script may stop and clear PIDS between phases (LONG_PIDS: for
# processes that outlive them, such as a nats-server).
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release

fail() {
  echo "error: $*" >&2
  exit 2
}
not_ok() {
  echo "FAIL: $*" >&2
  exit 1
}

# need_tools COMMAND:DEBIAN_PACKAGE ...: installs the packages of the
# commands that are missing.
need_tools() {
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

WORK=$(mktemp -d)
PIDS=()
LONG_PIDS=()
# stop_pids PID...: TERM, up to 5 s to exit, then KILL.
stop_pids() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
cleanup() {
  stop_pids "${PIDS[@]}" "${LONG_PIDS[@]}"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nobody accepts on, not handed out before by this script.
USED_PORTS=" "
free_port() {
  local port
  while :; do
    port=$((30000 + RANDOM % 30000))
    [[ $USED_PORTS == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}
# $(free_port) runs in a subshell: callers record what they got.
take_port() { # take_port VAR: VAR=<a free port>, remembered as used
  local port
  port=$(free_port)
  USED_PORTS+="$port "
  printf -v "$1" '%s' "$port"
}

# Only the flags a benchmark passes configure the server: no stray ARBITER_*.
clear_arbiter_env() {
  while read -r name; do unset "$name"; done < <(compgen -e | grep '^ARBITER_' || true)
}

# wait_ready ADMIN_PORT PID LOG: until /ready answers 200 (30 s at most).
wait_ready() {
  local admin=$1 pid=$2 log=$3
  for _ in $(seq 300); do
    curl -fsS -o /dev/null "http://127.0.0.1:$admin/ready" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "arbiter exited"; }
    sleep 0.1
  done
  cat "$log" >&2
  fail "arbiter is not ready after 30 s"
}

# median X...: the middle value; of an even count, the mean of the two middle
# ones.
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
    END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# CPU time (user + system, clock ticks) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
