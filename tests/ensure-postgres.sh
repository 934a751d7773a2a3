#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests use answers: with no URL given and nothing on 127.0.0.1:5432,
# starts the machine's Debian cluster (pg_ctlcluster) when there is one.
set -euo pipefail
url=${BPS_TEST_ADMIN_URL:-${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}}
# tests/test_translated_messages.py runs a database in German (lc_messages): the locale must exist where the
# server runs; made here when it is this machine's and we may.
if ! locale -a 2>/dev/null | grep -qi '^de_DE\.utf-\?8$' && [ "$(id -u)" = 0 ] && command -v localedef >/dev/null; then
    # (Outside the archive: a running server finds it without a restart.)
    localedef -i de_DE -c -f UTF-8 --no-archive de_DE.UTF-8 2>/dev/null || true
fi
if pg_isready -q -d "$url" 2>/dev/null; then
    exit 0
fi
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "starting PostgreSQL $version (cluster main)" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do pg_isready -q -d "$url" && exit 0; sleep 1; done
fi
echo "No PostgreSQL answers at $url: start one, or set BPS_TEST_ADMIN_URL to a server the tests may create databases on." >&2
exit 1
