# The BPS image: serve, execute, rail-simulator, migrate, seed-demo (docker/entrypoint.sh). Needs DATABASE_URL.
# Debian's Python in both stages; the wheel without the `embedded` extra; no pip or compiler in the final stage.

FROM debian:bookworm-slim AS build

ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get -qq update \
    && apt-get -qq install -y --no-install-recommends -o Dpkg::Use-Pty=0 python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Debian's CA bundle plus docker/ca/*.crt (a TLS-intercepting proxy's CA), for pip only.
COPY docker/ca/ /tmp/ca/
RUN { cat /etc/ssl/certs/ca-certificates.crt; find /tmp/ca -name '*.crt' -exec cat {} +; } > /tmp/pip-ca.pem

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/tmp/pip-ca.pem \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/bps

# The dependencies first (from pyproject.toml): a code change alone does not reinstall them.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/bps/bin/pip install --only-binary=:all: -r /tmp/requirements.txt

# The package, as a wheel (sql/ and migrations/ inside); then pip and setuptools go.
COPY README.md /src/
COPY service /src/service
COPY sql /src/sql
COPY migrations /src/migrations
RUN /opt/bps/bin/pip install /src \
    && /opt/bps/bin/pip check \
    && /opt/bps/bin/python -c "from service import db; assert db.SQL_DIR.is_relative_to(db.PACKAGE) and db.MIGRATIONS_DIR.is_relative_to(db.PACKAGE), db.SQL_DIR" \
    && /opt/bps/bin/pip uninstall --yes --quiet setuptools pip


FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get -qq update \
    && apt-get -qq install -y --no-install-recommends -o Dpkg::Use-Pty=0 python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-log-init --uid 10001 --user-group --home-dir /var/lib/bps --create-home --shell /usr/sbin/nologin bps \
    && install -d -o bps -g bps -m 0750 /rail

COPY --from=build /opt/bps /opt/bps
COPY docker/entrypoint.sh /usr/local/bin/bps-entrypoint

ENV PATH=/opt/bps/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BPS_HOST=0.0.0.0 \
    BPS_PORT=8000

# Where the simulated rail keeps its record by default.
WORKDIR /var/lib/bps
USER bps:bps
EXPOSE 8000
ENTRYPOINT ["bps-entrypoint"]
CMD ["serve"]
