# PostgreSQL 15 with pgTAP, so the psql-based tests (tests/sql/) can run against the compose database too.
FROM postgres:15

# Unpinned: the image's PostgreSQL apt repository keeps only the current pgTAP build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15-pgtap \
    && rm -rf /var/lib/apt/lists/*
