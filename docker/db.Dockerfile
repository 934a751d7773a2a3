# PostgreSQL 15 and pgTAP from Debian; docker/db-entrypoint.sh makes the cluster on first start.
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
# No cluster from the package's postinst: the volume's is made at first start.
# hadolint ignore=DL3008
RUN mkdir -p /etc/postgresql-common \
    && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
    && apt-get -qq update \
    && apt-get -qq install -y --no-install-recommends -o Dpkg::Use-Pty=0 postgresql-15 postgresql-15-pgtap \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
    && install -d -o postgres -g postgres -m 2775 /run/postgresql

COPY docker/db-entrypoint.sh /usr/local/bin/bps-db-entrypoint

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# Fast shutdown: open transactions roll back instead of being waited for.
STOPSIGNAL SIGINT
ENTRYPOINT ["bps-db-entrypoint"]
