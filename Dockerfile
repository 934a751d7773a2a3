# The BPS service: `python -m service serve|migrate|seed-demo`. It needs DATABASE_URL (docker-compose.yml sets it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BPS_HOST=0.0.0.0 \
    BPS_PORT=8000

WORKDIR /app

# The dependencies first, read from pyproject.toml, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The whole tree, installed editable: service/db.py finds sql/ and migrations/ beside service/.
COPY . .
RUN pip install --no-deps -e . \
    && python -m compileall -q service \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin bps \
    && mkdir /rail && chown 10001 /rail

USER 10001
EXPOSE 8000
CMD ["python", "-m", "service", "serve"]
