#!/bin/sh
# As postgres: on an empty data directory, initdb (POSTGRES_USER with POSTGRES_PASSWORD) and POSTGRES_DB;
# then the server in the foreground, on every interface, password (SCRAM) over TCP, trust on the socket.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-bps}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "bps-db: POSTGRES_PASSWORD must be set to make the database" >&2
        exit 1
    fi
    case $database in *'"'*)
        echo "bps-db: POSTGRES_DB may not contain a double quote" >&2
        exit 1
        ;;
    esac
    if [ ! -w "$PGDATA" ]; then
        echo "bps-db: $PGDATA is not writable by $(id -un) (uid $(id -u))" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    printf '\n# Any address, with the password.\nhost all all all scram-sha-256\n' \
        >>"$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        echo "CREATE DATABASE \"$database\" OWNER \"$user\";" | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "bps-db: made the cluster in $PGDATA, database $database"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
