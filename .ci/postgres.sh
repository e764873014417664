#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store's tests and benchmark.
#
#   .ci/postgres.sh            install if missing (into .venv), start, print `export ...=URL`
#   eval "$(.ci/postgres.sh)"  ... and put PERSONA_STUDIO_TEST_PG_URL in this shell
#   .ci/postgres.sh --url      print only the URL (starts nothing)
#   .ci/postgres.sh --stop     stop the server (its data directory stays)
#
# The cluster lives in $PERSONA_STUDIO_PG_DIR (default /tmp/persona-studio-pg),
# listens on 127.0.0.1 only, port $PERSONA_STUDIO_PG_PORT (default 55432), and
# has a role `persona_studio` that may create databases: the tests make one
# database per test and drop it afterwards. Never point it at data you want.
#
# If PERSONA_STUDIO_TEST_PG_URL is already set, that server is used as it is:
# nothing is installed or started (its role needs CREATEDB).
#
# Progress goes to stderr; stdout carries only the export line (or the URL),
# so the output can be eval'ed. Running it again while the server is up is a
# no-op that takes well under a second.
set -euo pipefail

PORT="${PERSONA_STUDIO_PG_PORT:-55432}"
DATA="${PERSONA_STUDIO_PG_DIR:-/tmp/persona-studio-pg}"
ROLE=persona_studio
PASSWORD=persona_studio  # loopback-only throwaway cluster: not a secret
DB=persona_studio
DEFAULT_URL="postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }

case "${1:-}" in
  --url)
    echo "${PERSONA_STUDIO_TEST_PG_URL:-$DEFAULT_URL}"
    exit 0 ;;
  --stop|--start|"") ;;
  *) die "unknown option $1 (use --url, --stop or nothing)" ;;
esac

if [ -n "${PERSONA_STUDIO_TEST_PG_URL:-}" ] && [ "${1:-}" != --stop ]; then
  say "using PERSONA_STUDIO_TEST_PG_URL as set; starting nothing"
  echo "export PERSONA_STUDIO_TEST_PG_URL='$PERSONA_STUDIO_TEST_PG_URL'"
  exit 0
fi

# The server binaries: PostgreSQL 16 with pgvector as the PyPI package `pgserver` ships them (only
# its binaries are used, so --no-deps), installed into the project's venv when missing: no root, no
# apt, and the knowledge index's vector search (chatbot/knowledge/search.py) is tested on pgvector.
# A PostgreSQL of the system's (Debian keeps it under /usr/lib/postgresql/N/bin) is the fallback.
PY="${PERSONA_STUDIO_PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"
pgserver_bindir() {
  "$PY" -c 'import importlib.util as u; s = u.find_spec("pgserver"); print(s.submodule_search_locations[0] if s else "")' \
    2>/dev/null | sed -n 's|.\+|&/pginstall/bin|p'
}
find_bindir() {
  local dir
  if [ -x "$PY" ]; then
    dir="$(pgserver_bindir)"
    if [ -z "$dir" ]; then
      say "installing pgserver (PostgreSQL 16 with pgvector) into $(dirname "$(dirname "$PY")")"
      "$PY" -m pip install -q --no-deps pgserver >&2 || true
      dir="$(pgserver_bindir)"
    fi
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  fi
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}

BIN="$(find_bindir)"
[ -n "$BIN" ] || die "the store tests need a PostgreSQL server: run 'make install' first (its venv gets the
  pgserver package), or set PERSONA_STUDIO_TEST_PG_URL to postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB
  where USER may create databases."

# initdb and postgres refuse to run as root: root runs them as `postgres`.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
  as_owner() { runuser -u postgres -- "$@"; }
  # A checkout under a private home: `postgres` cannot reach the binaries there, so it gets a copy
  # of the installation with its libraries beside it, where its RPATH finds them.
  if ! as_owner test -x "$BIN/initdb"; then
    PACKAGES="$(dirname "$(dirname "$(dirname "$BIN")")")"  # .../pgserver/pginstall/bin -> site-packages
    COPY=/tmp/persona-studio-pg-install
    if [ ! -x "$COPY/pgserver/pginstall/bin/initdb" ]; then
      rm -rf "$COPY" && mkdir -p "$COPY/pgserver"
      cp -r "$PACKAGES/pgserver/pginstall" "$COPY/pgserver/"
      [ ! -d "$PACKAGES/pgserver.libs" ] || cp -r "$PACKAGES/pgserver.libs" "$COPY/"
      chmod -R a+rX "$COPY"
    fi
    BIN="$COPY/pgserver/pginstall/bin"
  fi
else
  as_owner() { "$@"; }
fi

if [ "${1:-}" = --stop ]; then
  if [ -f "$DATA/PG_VERSION" ]; then as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >&2 || true; fi
  exit 0
fi

MAJOR="$("$BIN/postgres" --version | sed -n 's/.* \([0-9]\+\)\..*/\1/p')"
if [ -f "$DATA/PG_VERSION" ] && [ "$(cat "$DATA/PG_VERSION")" != "$MAJOR" ]; then
  say "$DATA holds a PostgreSQL $(cat "$DATA/PG_VERSION") cluster and the server is $MAJOR: making it again"
  if [ -f "$DATA/postmaster.pid" ]; then kill -INT "$(head -n 1 "$DATA/postmaster.pid")" 2>/dev/null || true; sleep 2; fi
  rm -rf "$DATA"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  say "creating a cluster in $DATA"
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres: "$DATA"
  chmod 700 "$DATA"
  # Local socket: trust (its directory is the data dir, only the owner gets in);
  # TCP on loopback: password.
  as_owner "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
fi

if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  say "starting PostgreSQL on 127.0.0.1:$PORT"
  # max_connections: the tests open an engine per test and the benchmark up to
  # 32 writers at once; the default 100 is close to that on a busy run.
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c max_connections=200" start >&2 \
    || { tail -n 20 "$DATA/server.log" >&2 || true; die "PostgreSQL did not start (is port $PORT taken? set PERSONA_STUDIO_PG_PORT)"; }
fi

psql_admin() { as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DATA" -p "$PORT" -U postgres -d postgres "$@"; }

if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
  psql_admin -c "CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'"
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE $DB OWNER $ROLE"
fi

# pgvector, for the knowledge index's vector search; the index also works without it (a numpy
# scan), so a server without it is not an error. It is not a trusted extension, so the tests' role
# cannot create it: created in template1 here, every database the tests create has it.
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")" = 1 ]; then
  for db in template1 "$DB"; do
    psql_admin -d "$db" -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null 2>&1 \
      || say "could not create the vector extension in $db"
  done
else
  say "this server ($BIN) has no pgvector; the knowledge tests use the slower search"
fi

say "ready: $DEFAULT_URL"
echo "export PERSONA_STUDIO_TEST_PG_URL='$DEFAULT_URL'"
