#!/usr/bin/env bash
# Makes debian:bookworm-slim where no registry can be reached: debootstrap --variant=minbase, slimmed as
# the official image is, then docker import. Usage: docker/debian-base.sh [TAG]. Root; uses DOCKER_HOST.
# The mirror is the host's (its apt sources), or BPS_DEBIAN_MIRROR and BPS_DEBIAN_SECURITY_MIRROR.
set -euo pipefail

tag=${1:-debian:bookworm-slim}
suite=bookworm

# The first URI of the host's apt sources ending in /debian (or /debian-security).
host_mirror() {
    local suffix=$1
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -oE '(https?|file)://[^[:space:]]+' | sed 's:/*$::' |
        grep -E "/${suffix}\$" | head -n 1 || true
}
mirror=${BPS_DEBIAN_MIRROR:-$(host_mirror debian)}
mirror=${mirror:-http://deb.debian.org/debian}
security=${BPS_DEBIAN_SECURITY_MIRROR:-$(host_mirror debian-security)}
security=${security:-http://deb.debian.org/debian-security}

command -v debootstrap >/dev/null || { echo "debian-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debian-base.sh: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/bps-rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
rootfs=$work/rootfs

echo "debian-base.sh: debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}

# As the official slim image: later installs stay small too.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
# No documentation, manual pages or translations (the copyrights stay).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/{groff,info,linda,lintian,man}/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +

cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
# No package cache in an image layer.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
printf 'Acquire::GzipIndexes "true";\n' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
printf 'APT::AutoRemove::SuggestsImportant "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
# No service starts during a build's install.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"

rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/lib/dpkg/*-old "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs/var/log" -type f -delete
: >"$rootfs/etc/machine-id"
: >"$rootfs/etc/resolv.conf"
echo localhost >"$rootfs/etc/hostname"

tar --numeric-owner --xattrs -C "$rootfs" -c . |
    docker import --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --message "debootstrap --variant=minbase $suite $mirror, slimmed" - "$tag" >/dev/null
echo "debian-base.sh: $tag $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')"
