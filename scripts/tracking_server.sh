#!/usr/bin/env bash
# A team's tracking server on this machine: PostgreSQL (Debian's postgresql) as the backend store, a local
# folder as the artifact root, `mlflow server` on 127.0.0.1. Usage:
#   scripts/tracking_server.sh start [DIR] [PORT]   # default DIR=.tracking PORT=5000; prints the URI to export
#   scripts/tracking_server.sh stop [DIR]
#   scripts/tracking_server.sh remove [DIR]          # stop, then delete DIR's database and DIR itself
# Postgres refuses to run as root, so as root the database runs as the `postgres` user.
set -euo pipefail
cmd=${1:-start}
dir=$(realpath -m "${2:-.tracking}")
port=${3:-5000}
pgport=${PGPORT_MLFLOW:-$((port + 432))}
pgbin=$(dirname "$(readlink -f "$(command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1)")")
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# The database files must be reachable by the user postgres runs as: as root, DIR may sit under folders only
# root can enter (a pytest tmp dir, /root), so they go to a folder of postgres' own, named by an id that DIR
# keeps (pg-id): a new DIR gets a new database, even at a path an earlier, deleted DIR had.
if [ "$(id -u)" = 0 ]; then
  if [ "$cmd" = start ] && [ ! -f "$dir/pg-id" ]; then
    mkdir -p "$dir"
    legacy=$(printf %s "$dir" | sha1sum | cut -c1-12)  # where DIR's database was kept before DIR kept an id
    if [ -d "$dir/artifacts" ] && [ -f "/var/tmp/bincounter-pg/$legacy/PG_VERSION" ]; then echo "$legacy"
    else od -An -N6 -tx1 /dev/urandom | tr -d ' \n'; fi >"$dir/pg-id.tmp"
    mv "$dir/pg-id.tmp" "$dir/pg-id"
  fi
  pgdata=/var/tmp/bincounter-pg/$(cat "$dir/pg-id" 2>/dev/null || echo none)
else
  pgdata=$dir/pg
fi

case "$cmd" in
start)
  mkdir -p "$dir/artifacts"
  if [ ! -f "$pgdata/PG_VERSION" ]; then
    mkdir -p "$pgdata"
    if [ "$(id -u)" = 0 ]; then chown postgres "$pgdata"; chmod 711 "$(dirname "$pgdata")"; fi
    as_pg "$pgbin/initdb" -D "$pgdata" -U mlflow --auth=trust >/dev/null
  fi
  as_pg "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pgport -k /tmp" start >/dev/null
  "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 \
    || "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U mlflow mlflow
  nohup mlflow server --backend-store-uri "postgresql://mlflow@127.0.0.1:$pgport/mlflow" \
    --artifacts-destination "$dir/artifacts" --host 127.0.0.1 --port "$port" --workers 2 \
    >"$dir/server.log" 2>&1 &
  echo $! >"$dir/server.pid"
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$(cat "$dir/server.pid")" 2>/dev/null || { cat "$dir/server.log"; exit 1; }
    sleep 1
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "mlflow server did not come up; see $dir/server.log"; exit 1; }
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$port"
  ;;
stop|remove)
  [ -f "$dir/server.pid" ] && kill "$(cat "$dir/server.pid")" 2>/dev/null || true
  rm -f "$dir/server.pid"
  [ -f "$pgdata/postmaster.pid" ] && as_pg "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null || true
  if [ "$cmd" = remove ]; then rm -rf "$pgdata" "$dir"; fi
  ;;
*) echo "usage: $0 start|stop|remove [DIR] [PORT]"; exit 2 ;;
esac
