#!/usr/bin/env bash
# Load benchmark of the PostgreSQL identity source (not run by the tests):
# USERS users (default 1,000,000), each in 10 of the 1,000 leaf groups of a
# 3-level hierarchy, with 3 attributes; then time to ready (gRPC health
# SERVING) of a release `arbiter serve` and its resident memory per user.
#
#   cargo build --release && USERS=100000 bash benches/identity_pg_load.sh
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) and psql.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
USERS=${USERS:-1000000}
# KEEP_DB=1: keep the loaded database (arbiter_load_<USERS>) for the next
# run, and reuse it when it is there (the load takes minutes at 1M).
# LOAD_ONLY=1 (with KEEP_DB=1): stop once the database is there
# (benches/identity_pg_decide.sh prepares its databases so).
if [[ -n "${KEEP_DB:-}" ]]; then DB=arbiter_load_$USERS; else DB=arbiter_load_$$; fi
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)
BIN=${ARBITER_BIN:-target/release/arbiter}

cleanup() {
  [[ -n "${PID:-}" ]] && kill "$PID" 2>/dev/null || true
  [[ -n "${KEEP_DB:-}" ]] || "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
}
trap cleanup EXIT

if [[ -n "${KEEP_DB:-}" ]] &&
  "${PSQL[@]}" -tA -c "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
  echo "reusing database $DB"
else
  "${PSQL[@]}" -c "CREATE DATABASE $DB"
  "${PSQL[@]}" -d "$DB" -f deploy/postgres/schema.sql
  started=$(date +%s.%N)
  "${PSQL[@]}" -d "$DB" <<SQL
-- Bulk load without the change-log triggers (a snapshot reads the tables).
ALTER TABLE tenants DISABLE TRIGGER arbiter_track;
ALTER TABLE groups DISABLE TRIGGER arbiter_track;
ALTER TABLE users DISABLE TRIGGER arbiter_track;
ALTER TABLE memberships DISABLE TRIGGER arbiter_track;
INSERT INTO tenants VALUES ('acme', 'Acme', 'enterprise', false);
INSERT INTO groups SELECT 'g' || a, 'acme', 'g' || a, NULL FROM generate_series(0, 9) a;
INSERT INTO groups SELECT 'g' || a || '-' || b, 'acme', 'g', 'g' || a
  FROM generate_series(0, 9) a, generate_series(0, 9) b;
INSERT INTO groups SELECT 'g' || a || '-' || b || '-' || c, 'acme', 'g', 'g' || a || '-' || b
  FROM generate_series(0, 9) a, generate_series(0, 9) b, generate_series(0, 9) c;
INSERT INTO users SELECT 'u' || n, 'acme', 'u' || n || '@example.test', 'active',
  jsonb_build_object('department', (ARRAY['eng','sales','ops'])[1 + n % 3], 'clearance', n % 4)
  FROM generate_series(1, $USERS) n;
INSERT INTO memberships SELECT 'u' || n,
  'g' || (((n * 7 + k * 101) % 1000) / 100) || '-' || ((((n * 7 + k * 101) % 1000) / 10) % 10)
      || '-' || ((n * 7 + k * 101) % 10)
  FROM generate_series(1, $USERS) n, generate_series(0, 9) k;
ALTER TABLE tenants ENABLE TRIGGER arbiter_track;
ALTER TABLE groups ENABLE TRIGGER arbiter_track;
ALTER TABLE users ENABLE TRIGGER arbiter_track;
ALTER TABLE memberships ENABLE TRIGGER arbiter_track;
ANALYZE;
SQL
  echo "loaded $USERS users into postgres in $(echo "$(date +%s.%N) - $started" | bc) s"

fi
[[ -n "${LOAD_ONLY:-}" && -n "${KEEP_DB:-}" ]] && exit 0

# How long the mapping query alone takes (part of the time to ready).
"${PSQL[@]}" -d "$DB" -c '\timing on' \
  -c 'SELECT count(*), sum(length(attrs::text) + length(parents::text)) FROM arbiter_entities'

dir=$(mktemp -d)
cp deploy/postgres/example.cedar "$dir/policies.cedar"
cat > "$dir/arbiter.toml" <<TOML
policies = "policies.cedar"
[identity.postgres]
url = "postgres://postgres@127.0.0.1:5432/$DB"
TOML
started=$(date +%s.%N)
"$BIN" serve --config "$dir/arbiter.toml" --listen 127.0.0.1:50791 --admin-listen 127.0.0.1:50792 \
  >"$dir/log" 2>&1 &
PID=$!
until curl -sf 127.0.0.1:50792/ready >/dev/null; do
  kill -0 "$PID" || { cat "$dir/log"; exit 1; }
  sleep 0.5
done
ready=$(echo "$(date +%s.%N) - $started" | bc)
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
report() {
  local kb peak
  kb=$(rss)
  peak=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
  echo "$1: resident $((kb / 1024)) MiB, $((kb * 1024 / USERS)) bytes per user (peak so far $((peak / 1024)) MiB)"
}
echo "time to ready: $ready s"
report "at ready"
# What the full sync read and freed goes back to the system after a while.
sleep 10
report "10 s later"
# The first change after a full sync makes the store's second copy (two maps
# of pointers; the entities are shared).
applied() {
  curl -sf 127.0.0.1:50792/metrics | awk '/^arbiter_identity_applied_position/ {print $2}'
}
before=$(applied)
"${PSQL[@]}" -d "$DB" -c "UPDATE users SET attributes = attributes || '{\"clearance\": 9}' WHERE id = 'u1'"
committed=$(date +%s.%N)
while [[ $(applied) == "$before" ]]; do sleep 0.005; done
echo "the first change after the full sync applied $(echo "($(date +%s.%N) - $committed) * 1000" | bc) ms after its COMMIT (polling /metrics)"
sleep 3
curl -sf 127.0.0.1:50792/metrics | grep -E '^arbiter_identity_(applied_position|store_copies_total)' || true
report "after one change"
