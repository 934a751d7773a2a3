# HAProxy from Debian in front of the service's replicas (docker/haproxy.cfg).
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get -qq update \
    && apt-get -qq install -y --no-install-recommends -o Dpkg::Use-Pty=0 haproxy \
    && rm -rf /var/lib/apt/lists/*

COPY docker/haproxy.cfg /etc/haproxy/haproxy.cfg
RUN haproxy -c -q -f /etc/haproxy/haproxy.cfg

USER haproxy
EXPOSE 8000 8404
# Soft stop: requests in flight finish.
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
