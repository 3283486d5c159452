# Sourced by .ci/run: a throw-away PostgreSQL cluster for the tests, exported as DHR_TEST_POSTGRES_URL.
#
# Installs Debian's `postgresql` when no server binaries are present (quiet; a no-op once installed), creates a
# cluster in a temporary folder owned by an unprivileged user (the `postgres` account the package creates when
# run as root, else the current user), starts it on a free loopback port with trust authentication and no fsync
# (test data only), and stops and removes it when the sourcing shell exits.

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(_pg_bin)" ]; then
    echo "postgres: installing Debian's postgresql" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
fi
PG_BIN="$(_pg_bin)"
[ -n "$PG_BIN" ] || { echo "postgres: no server binaries after installing postgresql" >&2; exit 1; }

PG_DIR="$(mktemp -d /tmp/dhr-ci-pg.XXXXXX)"
# run from the cluster folder: the postgres account may not be allowed into the clone's folder
if [ "$(id -u)" = 0 ]; then
    PG_USER=postgres
    _pg_as() { (cd "$PG_DIR" && runuser -u postgres -- "$@"); }
else
    PG_USER="$(id -un)"
    _pg_as() { "$@"; }
fi
chmod 755 "$PG_DIR"
[ "$(id -u)" = 0 ] && chown "$PG_USER" "$PG_DIR"
PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

_pg_stop() {
    _pg_as "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
}
trap _pg_stop EXIT

_pg_as "$PG_BIN/initdb" -D "$PG_DIR/data" -U dhr -A trust -E UTF8 --no-sync >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
_pg_as "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 start \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    >/dev/null || { cat "$PG_DIR/server.log" >&2; exit 1; }
_pg_as "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U dhr dhr_test
export DHR_TEST_POSTGRES_URL="postgresql+psycopg://dhr@127.0.0.1:$PG_PORT/dhr_test"
echo "postgres: $("$PG_BIN/postgres" --version) on 127.0.0.1:$PG_PORT (DHR_TEST_POSTGRES_URL)" >&2
