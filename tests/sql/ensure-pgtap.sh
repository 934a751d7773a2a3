#!/usr/bin/env bash
# Makes sure pgTAP and pg_prove are installed for the PostgreSQL at $1, installing Debian's packages if not.
set -euo pipefail
url=$1
available=$(psql "$url" -qtAX -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgtap'")
if [ "$available" = "1" ] && command -v pg_prove >/dev/null; then
    exit 0
fi
major=$(psql "$url" -qtAX -c "SELECT current_setting('server_version_num')::int / 10000")
packages="postgresql-$major-pgtap libtap-parser-sourcehandler-pgtap-perl"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "pgTAP is missing: install $packages (or run as root on Debian/Ubuntu)" >&2
    exit 1
fi
echo "installing $packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq $packages >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq $packages >/dev/null; }
