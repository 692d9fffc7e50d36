#!/usr/bin/env bash
# A team's MLflow store: `mlflow server` on PostgreSQL, serving the artifacts itself
# (--serve-artifacts), so that jobs on any node need only MLFLOW_TRACKING_URI=http://HOST:PORT
# (and, with authentication, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD).
#
#   scripts/mlflow_server.sh --db postgresql://USER:PASS@DBHOST:5432/mlflow [options] [-- mlflow args]
#       your PostgreSQL database (pip install -e ".[server]": psycopg 3 and mlflow[auth])
#   scripts/mlflow_server.sh --local [--dir DIR] [options]
#       a throwaway PostgreSQL started here (initdb + postgres, loopback only), to try it; it is
#       stopped when the server stops, and DIR (default: a new /tmp/l2lab-pg.XXXXXX) is deleted
#       unless you gave --dir
#
# options: --host ADDR (default 127.0.0.1; 0.0.0.0 to let other machines in)
#          --port PORT (default 5000)
#          --artifacts DIR_OR_URI (default ./mlartifacts, or DIR/artifacts with --local)
# login:   beyond loopback the server runs MLflow's basic-auth app: every request needs a user
#          and password (jobs export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD).
#          --admin-password-file FILE  the admin's password (first line of FILE, >= 12
#                     characters; keep FILE mode 600). Needed with authentication: set as the
#                     admin's password at every start. Never on the command line.
#          --admin-user NAME     the admin's user name (default admin)
#          --auth                authentication on loopback too (behind a reverse proxy on
#                                this machine, which lets other machines in)
#          --no-auth             no authentication beyond loopback: anyone who reaches the port
#                                can read, change and delete every run (a warning is printed)
#          --auth-db URL         where users and permissions live (default: the store's own
#                                PostgreSQL database, tables apart; with --local a second
#                                database, mlflow_auth, in the throwaway PostgreSQL)
# Users and permissions: scripts/mlflow_users.py (add, grant, password, remove, show).
# Anything after `--` goes to `mlflow server` (e.g. --workers 8, --allowed-hosts myhost).
# Runs in the foreground; Ctrl-C or SIGTERM stops the server (and the throwaway PostgreSQL).
set -euo pipefail

usage() {  # the comment block above
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}
say() { echo "mlflow_server.sh: $*"; }
die() { echo "mlflow_server.sh: $*" >&2; exit 2; }

DB="" LOCAL=0 DIR="" HOST=127.0.0.1 PORT=5000 ARTIFACTS="" EXTRA=()
AUTH="" PW_FILE="" ADMIN_USER=admin AUTH_DB=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --db) DB="${2:?--db needs a postgresql:// URL}"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --dir) DIR="${2:?--dir needs a folder}"; shift 2 ;;
    --host) HOST="${2:?}"; shift 2 ;;
    --port) PORT="${2:?}"; shift 2 ;;
    --artifacts) ARTIFACTS="${2:?}"; shift 2 ;;
    --auth) [[ "$AUTH" != off ]] || die "give --auth or --no-auth, not both"; AUTH=on; shift ;;
    --no-auth) [[ "$AUTH" != on ]] || die "give --auth or --no-auth, not both"; AUTH=off; shift ;;
    --admin-password-file) PW_FILE="${2:?--admin-password-file needs a file}"; shift 2 ;;
    --admin-user) ADMIN_USER="${2:?}"; shift 2 ;;
    --auth-db) AUTH_DB="${2:?--auth-db needs a database URL}"; shift 2 ;;
    --admin-password|--password) die "$1: a password on the command line is visible to every user of this machine (ps); put it in a file (mode 600) and give --admin-password-file FILE" ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "mlflow_server.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
if [[ -n "$DB" && $LOCAL == 1 ]] || [[ -z "$DB" && $LOCAL == 0 ]]; then
  echo "mlflow_server.sh: give exactly one of --db URL or --local" >&2; usage
fi

# -- authentication: on beyond loopback unless --no-auth; decided before anything starts -------
LOOPBACK=0
case "$HOST" in 127.*|localhost|::1|"[::1]") LOOPBACK=1 ;; esac
if [[ -z "$AUTH" ]]; then
  if [[ $LOOPBACK == 1 && -z "$PW_FILE" ]]; then AUTH=off; else AUTH=on; fi
fi
if [[ $AUTH == off && -n "$PW_FILE" ]]; then die "--no-auth and --admin-password-file contradict each other: drop one"; fi
ADMIN_PW=""
if [[ $AUTH == on ]]; then
  if [[ -z "$PW_FILE" ]]; then
    where="--host $HOST lets other machines in"; [[ $LOOPBACK == 1 ]] && where="--auth asks for a login"
    die "$where, so the server runs MLflow's basic-auth app, whose admin needs a password that only you know. Write it into a file that only you can read and name the file, e.g.
    (umask 077; openssl rand -base64 24 > ~/.mlflow_admin_password)
    scripts/mlflow_server.sh ... --admin-password-file ~/.mlflow_admin_password
(never the password itself on the command line: every user of this machine could read it). Or serve without authentication with --no-auth: anyone who reaches the port can then read, change and delete every run and artifact."
  fi
  [[ -f "$PW_FILE" && -r "$PW_FILE" ]] || die "--admin-password-file $PW_FILE: no such readable file"
  ADMIN_PW="$(head -n 1 -- "$PW_FILE" | tr -d '\r')"
  ADMIN_PW="${ADMIN_PW#"${ADMIN_PW%%[![:space:]]*}"}"; ADMIN_PW="${ADMIN_PW%"${ADMIN_PW##*[![:space:]]}"}"
  (( ${#ADMIN_PW} >= 12 )) || die "--admin-password-file $PW_FILE: the password (its first line) must have at least 12 characters (MLflow's rule)"
  [[ "$ADMIN_PW" != password1234 ]] || die "--admin-password-file $PW_FILE holds password1234, the default that older MLflow versions published: choose another"
  mode="$(stat -c %a -- "$PW_FILE" 2>/dev/null || echo 600)"
  if [[ "$mode" =~ [1-7]$ || "$mode" =~ [1-7].$ ]]; then
    say "warning: $PW_FILE (mode $mode) can be read by other users: chmod 600 $PW_FILE"
  fi
elif [[ $LOOPBACK == 0 ]]; then
  say "WARNING: --no-auth: serving on $HOST:$PORT without authentication. Anyone who reaches this port can read, change and delete every run and artifact."
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MLFLOW="${MLFLOW:-}"
if [[ -z "$MLFLOW" ]]; then
  if [[ -x "$ROOT/.venv/bin/mlflow" ]]; then MLFLOW="$ROOT/.venv/bin/mlflow"; else MLFLOW=mlflow; fi
fi
command -v "$MLFLOW" >/dev/null || { echo "mlflow_server.sh: no mlflow (make venv, or pip install -e '.[server]')" >&2; exit 2; }
PY="$(dirname "$(command -v "$MLFLOW")")/python"; [[ -x "$PY" ]] || PY=python3
if [[ $AUTH == on ]]; then
  "$PY" -c 'import flask_wtf, mlflow.server.auth' 2>/dev/null ||
    die "MLflow's basic-auth app needs the mlflow[auth] extra (Flask-WTF), which $PY lacks: pip install -e '.[server]' (make venv installs it), or pip install 'mlflow[auth]'"
fi

PG_BIN="" PG_DATA="" CLEANUP_DIR="" AUTH_DIR="" SERVER=""
as_pg() {  # initdb and postgres refuse to run as root: run them as the postgres user then
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
  if [[ -n "$AUTH_DIR" ]]; then rm -rf "$AUTH_DIR"; fi  # the private auth config (passwords)
  if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  fi
  if [[ -n "$CLEANUP_DIR" ]]; then rm -rf "$CLEANUP_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $LOCAL == 1 ]]; then
  for d in $(command -v initdb 2>/dev/null | xargs -r dirname) /usr/lib/postgresql/*/bin; do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then PG_BIN="$d"; fi
  done
  [[ -n "$PG_BIN" ]] || { echo "mlflow_server.sh: PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL or use --db URL" >&2; exit 2; }
  if [[ -z "$DIR" ]]; then DIR="$(mktemp -d /tmp/l2lab-pg.XXXXXX)"; CLEANUP_DIR="$DIR"; fi
  mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"
  chmod 755 "$DIR"
  PG_DATA="$DIR/pgdata"
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    mkdir -p "$PG_DATA"
    if [[ $(id -u) == 0 ]]; then chown postgres "$PG_DATA"; fi
    as_pg test -w "$PG_DATA" || { echo "mlflow_server.sh: the postgres user cannot write $PG_DATA: choose a --dir outside private (0700) folders" >&2; exit 2; }
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DATA" start >/dev/null
  for db in mlflow $([[ $AUTH == on && -z "$AUTH_DB" ]] && echo mlflow_auth); do
    as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 ||
      as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db"
  done
  DB="postgresql://postgres@127.0.0.1:$PG_PORT/mlflow"
  [[ $AUTH == on && -z "$AUTH_DB" ]] && AUTH_DB="postgresql://postgres@127.0.0.1:$PG_PORT/mlflow_auth"
  ARTIFACTS="${ARTIFACTS:-$DIR/artifacts}"
  say "throwaway PostgreSQL in $PG_DATA on 127.0.0.1:$PG_PORT"
fi
ARTIFACTS="${ARTIFACTS:-$PWD/mlartifacts}"
hide() { sed -E 's#://([^:@/]+):[^@]*@#://\1:***@#' <<<"$1"; }

APP=()
if [[ $AUTH == on ]]; then
  AUTH_DB="${AUTH_DB:-$DB}"
  # MLflow reads the auth settings from an ini file: a private one (mode 600 in a mode 700
  # folder), deleted when the script exits. configparser reads '%' as interpolation: doubled.
  AUTH_DIR="$(mktemp -d "${TMPDIR:-/tmp}/l2lab-auth.XXXXXX")"
  (umask 077; cat >"$AUTH_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = ${AUTH_DB//%/%%}
admin_username = $ADMIN_USER
admin_password = ${ADMIN_PW//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  )
  export MLFLOW_AUTH_CONFIG_PATH="$AUTH_DIR/basic_auth.ini"
  if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD+x}${MLFLOW_AUTH_ADMIN_USERNAME+x}" ]]; then
    say "ignoring MLFLOW_AUTH_ADMIN_USERNAME/MLFLOW_AUTH_ADMIN_PASSWORD: the admin is --admin-user, its password the file's"
    unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_USERNAME  # MLflow would prefer them to the ini
  fi
  # The CSRF key of the login forms: the same in every worker (MLflow asks for it); a fresh
  # random one per start unless you set it (several servers behind one name must share it).
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  # Before the server listens: the admin exists and has the file's password (MLflow itself
  # sets it only when it creates the admin, so a changed file would otherwise be ignored).
  "$PY" - <<'EOF' || die "could not prepare the users' database $(hide "$AUTH_DB") (see above)"
import logging
logging.disable(logging.WARNING)
from mlflow.server.auth.config import read_auth_config
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore
cfg = read_auth_config()
store = SqlAlchemyStore()
store.init_db(cfg.database_uri)
name, password = cfg.admin_username, cfg.admin_password
if not store.has_user(name, use_primary=True):
    store.create_user(name, password, is_admin=True)
    print(f"mlflow_server.sh: created the admin user {name!r} with the password of the file")
elif not store.authenticate_user(name, password, use_primary=True):
    store.update_user(name, password=password, is_admin=True)
    print(f"mlflow_server.sh: set the password of the admin user {name!r} to the file's")
else:
    store.update_user(name, is_admin=True)
EOF
  APP=(--app-name basic-auth)
  say "authentication on (MLflow basic-auth): users and permissions in $(hide "$AUTH_DB"); admin user '$ADMIN_USER', password from $PW_FILE"
fi

SHOWN_HOST="$HOST"; [[ "$HOST" == 0.0.0.0 ]] && SHOWN_HOST="$(hostname)"
say "store $(hide "$DB"), artifacts $ARTIFACTS"
say "jobs use   export MLFLOW_TRACKING_URI=http://$SHOWN_HOST:$PORT"
if [[ $AUTH == on ]]; then
  say "and        export MLFLOW_TRACKING_USERNAME=NAME MLFLOW_TRACKING_PASSWORD=... (their own login: scripts/mlflow_users.py add NAME)"
fi
# not exec: the trap must stop PostgreSQL and remove the auth config after the server ends
"$MLFLOW" server --backend-store-uri "$DB" --serve-artifacts --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" ${APP[@]+"${APP[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER; exit 143' TERM
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER; exit 130' INT
wait $SERVER
