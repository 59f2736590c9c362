#!/usr/bin/env bash
# Footprint of the sidecar (not run by the tests; figures in
# benches/README.md "Footprint", used to size deploy/kubernetes):
#   1. idle RSS with the example set: the sidecar overlay's settings
#      (deploy/kubernetes/base/arbiter.toml: its policies, Postgres identity
#      with deploy/postgres's example data, the spool), 10 s after ready;
#   2. RSS and startup-to-ready with 10k policies (no identity source);
#   3. RSS and startup-to-ready with 100k users synced from PostgreSQL
#      (benches/identity_pg_load.sh's data set);
#   4. binary and image size (a FROM scratch image: deploy/build-scratch-image.sh).
#
#   cargo build --profile image && bash benches/footprint.sh
#
# ARBITER_BIN picks the binary [default: target/image/arbiter, the image's].
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth), psql, curl; podman for 4.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${ARBITER_BIN:-${CARGO_TARGET_DIR:-target}/image/arbiter}
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)
GRPC=127.0.0.1:50891
ADMIN=127.0.0.1:50892
DB=arbiter_footprint_$$
dir=$(mktemp -d)
PID=

cleanup() {
  [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# Starts `arbiter serve --config $1`; READY is the seconds to /ready 200.
start() {
  local started
  if curl -s "$ADMIN/ready" >/dev/null; then
    echo "something already listens on $ADMIN" >&2
    exit 1
  fi
  started=$(date +%s.%N)
  "$BIN" serve --config "$1" --listen "$GRPC" --admin-listen "$ADMIN" >/dev/null 2>"$dir/log" &
  PID=$!
  until curl -sf "$ADMIN/ready" >/dev/null; do
    kill -0 "$PID" 2>/dev/null || { cat "$dir/log" >&2; exit 1; }
    sleep 0.01
  done
  READY=$(echo "$(date +%s.%N) - $started" | bc)
}
stop() {
  kill "$PID"
  wait "$PID" || true
  PID=
}
mib() { awk -v key="$1" '$1 == key":" {printf "%.1f", $2 / 1024}' "/proc/$PID/status"; }

echo "binary: $BIN ($(du -m "$BIN" | cut -f1) MiB)"

# 1. The example set, as the sidecar overlay configures it (paths local).
"${PSQL[@]}" -c "CREATE DATABASE $DB"
"${PSQL[@]}" -d "$DB" -f deploy/postgres/schema.sql -f deploy/postgres/example-data.sql
mkdir -p "$dir/policies" "$dir/spool"
cp deploy/kubernetes/base/policies/policies.cedar "$dir/policies/"
echo "postgres://postgres@127.0.0.1:5432/$DB" >"$dir/postgres-url"
echo "unused" >"$dir/postgres-password"
sed -e "s|/etc/arbiter/policies|$dir/policies|" \
  -e "s|/etc/arbiter/secrets/|$dir/|" \
  -e "s|/var/lib/arbiter/spool|$dir/spool|" \
  -e '/^listen_uds/d' \
  deploy/kubernetes/base/arbiter.toml >"$dir/example.toml"
start "$dir/example.toml"
sleep 10
echo "example set: ready in ${READY}s; idle RSS $(mib VmRSS) MiB (peak $(mib VmHWM) MiB)"
stop

# 2. 10k policies, each naming its own principal and resource.
mkdir -p "$dir/p10k"
for ((i = 0; i < 10000; i++)); do
  printf '@id("p%d")\npermit (principal == Saas::User::"u%d", action == Saas::Action::"read", resource == Saas::Document::"d%d");\n' \
    "$i" "$i" "$i"
done >"$dir/p10k/policies.cedar"
printf 'policies = "p10k"\n[decision_log]\nspool_dir = "spool"\n' >"$dir/p10k.toml"
start "$dir/p10k.toml"
echo "10k policies: ready in ${READY}s; RSS at ready $(mib VmRSS) MiB (peak $(mib VmHWM) MiB)"
stop

# 3. 100k users synced from PostgreSQL (benches/identity_pg_load.sh's data,
# kept as arbiter_load_100000 for the next run).
KEEP_DB=1 LOAD_ONLY=1 USERS=100000 bash benches/identity_pg_load.sh >/dev/null
cat >"$dir/users.toml" <<TOML
policies = "policies"
[decision_log]
spool_dir = "spool"
[identity.postgres]
url = "postgres://postgres@127.0.0.1:5432/arbiter_load_100000"
TOML
start "$dir/users.toml"
at_ready=$(mib VmRSS)
sleep 10
echo "100k users: ready in ${READY}s; RSS at ready ${at_ready} MiB, 10 s later $(mib VmRSS) MiB (peak $(mib VmHWM) MiB)"
stop

# 4. Image size, when podman is here.
if command -v podman >/dev/null 2>&1; then
  tag=localhost/arbiter-footprint:$$
  bash deploy/build-scratch-image.sh "$BIN" "$tag" >/dev/null
  bytes=$(podman image inspect "$tag" --format '{{.Size}}')
  echo "image (FROM scratch, binary + libraries + CA bundle): $((bytes / 1024 / 1024)) MiB"
  podman rmi -f "$tag" >/dev/null
fi
