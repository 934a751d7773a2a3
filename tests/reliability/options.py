"""Command-line defaults that the environment may set: BPS_REL_<NAME> for the reliability run, BPS_HA_<NAME>
for the HA run."""

from __future__ import annotations

import os


def from_env(prefix: str, name: str, default):
    """`prefix`_`NAME` from the environment, as the type of `default`; `default` when unset or empty."""
    value = os.environ.get(f"{prefix}_{name.upper()}")
    return default if value in (None, "") else type(default)(value)
