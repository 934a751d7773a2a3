"""The psql walkthroughs of examples/ answer what their .out files say.

Each examples/NN_name.sql runs in a freshly migrated database of its own, as
`psql -X -a -v ON_ERROR_STOP=1 -f examples/NN_name.sql`, and its output must equal examples/NN_name.out once
both are masked (the rule is MASKS below, and examples/README.md says it in words): what differs from one
run to the next (timestamps, API keys, a report's message id) becomes a placeholder, and since psql pads a
column to its widest value, runs of spaces and of dashes count as one. Ids are not masked: a fresh database
gives the same ones every time.

`BPS_EXAMPLES_UPDATE=1 .venv/bin/pytest tests/test_examples.py` rewrites the .out files from this run
(API keys and their hints masked); review the diff before committing it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT, migrated_database

EXAMPLES = sorted((ROOT / "examples").glob("*.sql"))
UPDATE = os.environ.get("BPS_EXAMPLES_UPDATE") == "1"

# A key is 'bps_' and 38 base62 characters; bps.api_keys shows its last 4 as a hint. Same widths, no secret.
KEY = (re.compile(r"\bbps_[0-9A-Za-z]{38}\b"), "bps_" + "x" * 38)
HINT = (re.compile(r"bps_…[0-9A-Za-z]{4}"), "bps_…xxxx")
MASKS = [
    KEY,
    HINT,
    # Timestamps as PostgreSQL and JSON print them: 2026-12-01 22:55:50.168041+00, 2026-12-01T22:55:50.168Z.
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d(:\d\d)?)?"), "<timestamp>"),
    # A pain.002 report's MsgId: its bulk transfer's id, then the millisecond it was made.
    (re.compile(r"<MsgId>BPS(\d+)R\d+</MsgId>"), r"<MsgId>BPS\1R<millisecond></MsgId>"),
    # psql's padding follows the widest value of a column, masked ones included.
    (re.compile(r" +"), " "),
    (re.compile(r"-{2,}"), "--"),
]


def masked(text: str) -> str:
    for pattern, placeholder in MASKS:
        text = pattern.sub(placeholder, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def psql() -> str:
    path = shutil.which("psql")
    assert path, "psql is needed to run examples/ (Debian: apt-get install postgresql-client)"
    return path


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
async def test_the_example_answers_what_its_out_file_shows(example: Path):
    async with migrated_database("bps_example") as url:
        run = await asyncio.to_thread(
            subprocess.run,
            [psql(), "-X", "-a", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", example.name],
            cwd=example.parent,
            capture_output=True,
            text=True,
            env=os.environ | {"PGTZ": "UTC", "PGCLIENTENCODING": "UTF8"},
            timeout=120,
        )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    expected = example.with_suffix(".out")
    if UPDATE:
        expected.write_text(HINT[0].sub(HINT[1], KEY[0].sub(KEY[1], run.stdout)))
    assert expected.exists(), f"{expected.name} is missing: run with BPS_EXAMPLES_UPDATE=1 to write it"
    assert masked(run.stdout) == masked(expected.read_text())


def test_every_example_has_its_out_file_and_nothing_else_is_left_over():
    outs = {p.stem for p in (ROOT / "examples").glob("*.out")}
    assert outs == {e.stem for e in EXAMPLES}
