#!/usr/bin/env bash
# An MLflow tracking server for a cluster's jobs: PostgreSQL as its store and the artifacts it
# serves, all kept in DIR (docs/mlflow-server.md).
#   scripts/mlflow-server.sh DIR [mlflow server options]      (defaults: --host 0.0.0.0 --port 5000)
# PostgreSQL is this script's own, made in DIR/postgres on first use and reached only through a unix
# socket there (no TCP port; DIR is private to its owner; as root, PostgreSQL runs as PG_USER, default
# postgres). `mlflow server` stores runs in it and artifacts in DIR/artifacts, which it serves: jobs
# upload and download through it, so no node mounts DIR. Runs in the foreground; Ctrl-C or SIGTERM
# stops the server, then PostgreSQL. Tested by tests/test_mlflow_server.py.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,9p' "$0" | cut -c3-
    exit $(($# < 1))
fi
dir=$(realpath -m "$1")
shift
if [ -z "${PG_BIN:-}" ]; then                   # initdb on PATH, else Debian's (kept off PATH)
    initdb=$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1) || true
    PG_BIN=$([ -n "$initdb" ] && dirname "$(realpath "$initdb")") || true
fi
[ -x "${PG_BIN:-}/pg_ctl" ] || { echo "$0: PostgreSQL not found (set PG_BIN to the folder of initdb and pg_ctl)" >&2; exit 1; }
pg=$dir/postgres                                # PostgreSQL's data, and its socket
as_pg=()
mkdir -p "$dir"
chmod 700 "$dir"
if [ "$(id -u)" = 0 ]; then                     # PostgreSQL refuses root: it runs as PG_USER (default postgres)
    as_pg=(runuser -u "${PG_USER:-postgres}" --)
    chown "${PG_USER:-postgres}" "$dir"
fi
if [ ! -f "$pg/PG_VERSION" ]; then              # first use: a cluster whose superuser is `mlflow`
    "${as_pg[@]}" "$PG_BIN/initdb" -D "$pg" -U mlflow --auth-local=trust --auth-host=reject -E UTF8 --no-locale >/dev/null
fi
"${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$pg" -l "$pg/postgres.log" -w -t 60 \
    -o "-c listen_addresses='' -c unix_socket_directories='$pg'" start >/dev/null ||
    { tail -n 20 "$pg/postgres.log" >&2; exit 1; }

server=
stop() {                                        # the server first: it writes to PostgreSQL until it ends
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" || true
    fi
    "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$pg" -m fast -w -t 60 stop >/dev/null
}
trap stop EXIT
trap 'exit 143' TERM INT HUP

if [ -z "$("${as_pg[@]}" "$PG_BIN/psql" -h "$pg" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")" ]; then
    "${as_pg[@]}" "$PG_BIN/createdb" -h "$pg" -U mlflow mlflow
fi

# Jobs name this machine in their tracking URI (http://<host>:<port>), and MLflow answers only the
# Host headers it allows (by default localhost and private addresses): allow this machine's names.
allowed="localhost:*,127.0.0.1:*"
for name in $(hostname) $(hostname -s) $(hostname -f 2>/dev/null) $(hostname -I 2>/dev/null | tr ' ' '\n' | grep -v :); do
    allowed+=",$name:*"
done
# Runs, metrics and artifacts need none of the GenAI job runners MLflow would start (six processes).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
mlflow server --backend-store-uri "postgresql+psycopg2://mlflow@/mlflow?host=$pg" \
    --artifacts-destination "file://$dir/artifacts" --host 0.0.0.0 --port 5000 --allowed-hosts "$allowed" "$@" &
server=$!
wait "$server"
