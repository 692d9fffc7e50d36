#!/usr/bin/env bash
# A team's MLflow store: `mlflow server` on PostgreSQL, serving the artifacts itself
# (--serve-artifacts), so that jobs on any node need only MLFLOW_TRACKING_URI=http://HOST:PORT.
#
#   scripts/mlflow_server.sh --db postgresql://USER:PASS@DBHOST:5432/mlflow [options] [-- mlflow args]
#       your PostgreSQL database (pip install -e ".[server]" for its driver, psycopg 3)
#   scripts/mlflow_server.sh --local [--dir DIR] [options]
#       a throwaway PostgreSQL started here (initdb + postgres, loopback only), to try it; it is
#       stopped when the server stops, and DIR (default: a new /tmp/l2lab-pg.XXXXXX) is deleted
#       unless you gave --dir
#
# options: --host ADDR (default 127.0.0.1; 0.0.0.0 to let other machines in)
#          --port PORT (default 5000)
#          --artifacts DIR_OR_URI (default ./mlartifacts, or DIR/artifacts with --local)
# Anything after `--` goes to `mlflow server` (e.g. --workers 8, --allowed-hosts myhost).
# Runs in the foreground; Ctrl-C or SIGTERM stops the server (and the throwaway PostgreSQL).
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

DB="" LOCAL=0 DIR="" HOST=127.0.0.1 PORT=5000 ARTIFACTS="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --db) DB="${2:?--db needs a postgresql:// URL}"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --dir) DIR="${2:?--dir needs a folder}"; shift 2 ;;
    --host) HOST="${2:?}"; shift 2 ;;
    --port) PORT="${2:?}"; shift 2 ;;
    --artifacts) ARTIFACTS="${2:?}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "mlflow_server.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
if [[ -n "$DB" && $LOCAL == 1 ]] || [[ -z "$DB" && $LOCAL == 0 ]]; then
  echo "mlflow_server.sh: give exactly one of --db URL or --local" >&2; usage
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MLFLOW="${MLFLOW:-}"
if [[ -z "$MLFLOW" ]]; then
  if [[ -x "$ROOT/.venv/bin/mlflow" ]]; then MLFLOW="$ROOT/.venv/bin/mlflow"; else MLFLOW=mlflow; fi
fi
command -v "$MLFLOW" >/dev/null || { echo "mlflow_server.sh: no mlflow (make venv, or pip install -e '.[server]')" >&2; exit 2; }

PG_BIN="" PG_DATA="" CLEANUP_DIR=""
as_pg() {  # initdb and postgres refuse to run as root: run them as the postgres user then
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
stop_local() {
  if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  fi
  if [[ -n "$CLEANUP_DIR" ]]; then rm -rf "$CLEANUP_DIR"; fi
}

if [[ $LOCAL == 1 ]]; then
  for d in $(command -v initdb 2>/dev/null | xargs -r dirname) /usr/lib/postgresql/*/bin; do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then PG_BIN="$d"; fi
  done
  [[ -n "$PG_BIN" ]] || { echo "mlflow_server.sh: PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL or use --db URL" >&2; exit 2; }
  if [[ -z "$DIR" ]]; then DIR="$(mktemp -d /tmp/l2lab-pg.XXXXXX)"; CLEANUP_DIR="$DIR"; fi
  mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"
  chmod 755 "$DIR"
  PG_DATA="$DIR/pgdata"
  trap stop_local EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    mkdir -p "$PG_DATA"
    if [[ $(id -u) == 0 ]]; then chown postgres "$PG_DATA"; fi
    as_pg test -w "$PG_DATA" || { echo "mlflow_server.sh: the postgres user cannot write $PG_DATA: choose a --dir outside private (0700) folders" >&2; exit 2; }
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DATA" start >/dev/null
  as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 ||
    as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres mlflow
  DB="postgresql://postgres@127.0.0.1:$PG_PORT/mlflow"
  ARTIFACTS="${ARTIFACTS:-$DIR/artifacts}"
  echo "mlflow_server.sh: throwaway PostgreSQL in $PG_DATA on 127.0.0.1:$PG_PORT"
fi
ARTIFACTS="${ARTIFACTS:-$PWD/mlartifacts}"

SHOWN_HOST="$HOST"; [[ "$HOST" == 0.0.0.0 ]] && SHOWN_HOST="$(hostname)"
echo "mlflow_server.sh: store $(sed -E 's#://([^:@/]+):[^@]*@#://\1:***@#' <<<"$DB"), artifacts $ARTIFACTS"
echo "mlflow_server.sh: jobs use   export MLFLOW_TRACKING_URI=http://$SHOWN_HOST:$PORT"
# not exec: with --local the trap must stop PostgreSQL after the server ends
"$MLFLOW" server --backend-store-uri "$DB" --serve-artifacts --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" "${EXTRA[@]}" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER; exit 143' TERM
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER; exit 130' INT
wait $SERVER
