#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store's tests and benchmark.
#
#   .ci/postgres.sh            install if missing (root only), start, print `export ...=URL`
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

# The server binaries: Debian keeps them out of PATH, under /usr/lib/postgresql/N/bin.
find_bindir() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}

BIN="$(find_bindir)"
if [ -z "$BIN" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's postgresql package"
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    # The package starts a cluster on 5432; ours is separate, so leave it.
    BIN="$(find_bindir)"
  fi
  [ -n "$BIN" ] || die "the store tests need a PostgreSQL server: sudo apt-get install postgresql
  (then run this script or 'make test' again), or set PERSONA_STUDIO_TEST_PG_URL to
  postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB where USER may create databases."
fi

# initdb and postgres refuse to run as root: root runs them as `postgres`.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
  as_owner() { runuser -u postgres -- "$@"; }
else
  as_owner() { "$@"; }
fi

if [ "${1:-}" = --stop ]; then
  if [ -f "$DATA/PG_VERSION" ]; then as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >&2 || true; fi
  exit 0
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

# pgvector, for the knowledge index's vector search (chatbot/knowledge/search.py); the index
# also works without it, more slowly, so a server without it is not an error. Debian packages it
# as postgresql-N-pgvector (from trixie on; bookworm has none). It is not a trusted extension, so
# the tests' role cannot create it: created in template1 here, every database the tests create
# has it. Tried once per cluster (the marker), so that later runs stay fast.
has_pgvector() { [ "$(psql_admin -tAc "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")" = 1 ]; }
if ! has_pgvector && [ ! -e "$DATA/.pgvector-tried" ]; then
  PGVECTOR_PKG="postgresql-$(basename "$(dirname "$BIN")")-pgvector"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-cache show "$PGVECTOR_PKG" >/dev/null 2>&1 || apt-get update -q >&2; } || true
    if apt-cache show "$PGVECTOR_PKG" >/dev/null 2>&1; then
      say "installing Debian's $PGVECTOR_PKG"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PGVECTOR_PKG" >&2 || true
    fi
  fi
  has_pgvector || say "no pgvector for this server ($PGVECTOR_PKG); the knowledge tests use the slower search"
  touch "$DATA/.pgvector-tried" 2>/dev/null || true
fi
if has_pgvector; then
  for db in template1 "$DB"; do
    psql_admin -d "$db" -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null 2>&1 \
      || say "could not create the vector extension in $db"
  done
fi

say "ready: $DEFAULT_URL"
echo "export PERSONA_STUDIO_TEST_PG_URL='$DEFAULT_URL'"
