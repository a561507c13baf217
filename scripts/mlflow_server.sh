#!/usr/bin/env bash
# An MLflow tracking server for moe_morpheus runs: runs in a SQLite database, artifacts (config.yaml,
# moe_load.json) uploaded through the server into a folder, bound to 127.0.0.1 unless told otherwise.
#
#   scripts/mlflow_server.sh [DIR]          # DIR (default mlflow_server/) holds mlflow.db and artifacts/
#   python train.py +experiment=moe_8e tracking.uri=http://127.0.0.1:5000
#
# Environment:
#   HOST=127.0.0.1  PORT=5000  WORKERS=2    where it listens; HOST=0.0.0.0 only together with AUTH=1
#   AUTH=1                                  MLflow's basic authentication (a shared server): every request
#                                           needs a user; the admin is created on first start with the
#                                           password in MLFLOW_AUTH_ADMIN_PASSWORD (required then)
#   AUTH_CACHE_TTL_S=600                    how long a worker trusts a checked password: each check is a
#                                           scrypt hash, 3-4 s per request on 2 busy cores, and a run
#                                           makes a request per logged step (a changed password reaches
#                                           the other workers after this long)
#   DEFAULT_PERMISSION=EDIT                 what every signed-in user may do in every experiment (EDIT: log
#                                           runs into a team's shared experiment; READ: only their own)
#   MLFLOW=.venv/bin/mlflow                 the mlflow executable
# Clients sign in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment. Users:
#   curl -u admin:$MLFLOW_AUTH_ADMIN_PASSWORD -X POST http://HOST:PORT/api/2.0/mlflow/users/create \
#        -H 'Content-Type: application/json' -d '{"username": "alice", "password": "..."}'
# Extra arguments after DIR go to `mlflow server` (e.g. --allowed-hosts for a public name).
set -euo pipefail
DIR=${1:-mlflow_server}
shift || true
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
# 2 workers: the UI and a sweep's writers do not queue behind each other; each costs ~250 MB and
# several seconds of start-up (4, mlflow's default, took 37 s to answer on 2 busy cores).
WORKERS=${WORKERS:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
MLFLOW=${MLFLOW:-$REPO/.venv/bin/mlflow}
mkdir -p "$DIR/artifacts"
DIR=$(cd "$DIR" && pwd)
args=(--backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "$DIR/artifacts"
      --host "$HOST" --port "$PORT" --workers "$WORKERS")
if [[ "${AUTH:-0}" == 1 ]]; then
  if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" && ! -f "$DIR/basic_auth.db" ]]; then
    echo "error: AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD for the admin user on first start" >&2
    exit 2
  fi
  # The users live next to the runs, not in basic_auth.db of whatever directory the server starts in.
  cat > "$DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = ${DEFAULT_PERMISSION:-EDIT}
database_uri = sqlite:///$DIR/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${AUTH_CACHE_TTL_S:-600}
INI
  export MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini"
  # The auth app's CSRF protection refuses to start without a secret shared by all workers and
  # restarts: made once, kept next to the users, readable by the owner only.
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    [[ -f "$DIR/flask_secret_key" ]] || (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/flask_secret_key")
    export MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$DIR/flask_secret_key")
  fi
  args+=(--app-name basic-auth)
elif [[ "$HOST" != 127.0.0.1 && "$HOST" != localhost ]]; then
  echo "error: HOST=$HOST exposes an open server (anyone can read and delete runs): add AUTH=1" >&2
  exit 2
fi
echo "MLflow server: http://$HOST:$PORT (runs: $DIR/mlflow.db, artifacts: $DIR/artifacts)"
exec "$MLFLOW" server "${args[@]}" "$@"
