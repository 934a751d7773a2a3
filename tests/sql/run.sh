#!/usr/bin/env bash
# Runs the pgTAP tests of tests/sql/ with pg_prove against a fresh database of their own, dropped afterwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${VENV:-$root/.venv}
admin_url=${BPS_TEST_ADMIN_URL:-${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}}

BPS_TEST_ADMIN_URL="$admin_url" "$here/../ensure-postgres.sh"
"$here/ensure-pgtap.sh" "$admin_url"

name="bps_sqltest_$(date +%s)_$$"
db_url="${admin_url%/*}/$name"
psql "$admin_url" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$name\"" >/dev/null
cleanup() {
    # The database, and the roles it made for itself (roles belong to the whole server).
    roles=$(psql "$db_url" -qtAX -c "SELECT string_agg(quote_ident(role_name), ', ') FROM bps.database_roles" 2>/dev/null || true)
    psql "$admin_url" -qX -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" >/dev/null
    if [ -n "$roles" ]; then psql "$admin_url" -qX -c "DROP ROLE IF EXISTS $roles" >/dev/null; fi
}
trap cleanup EXIT

DATABASE_URL="$db_url" "$venv/bin/python" -m service migrate >/dev/null 2>&1
psql "$db_url" -qX -v ON_ERROR_STOP=1 -c "CREATE EXTENSION IF NOT EXISTS pgtap" >/dev/null
pg_prove --dbname "$db_url" --ext .sql -r "$here"
