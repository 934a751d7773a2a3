"""The reliability harness: `python -m tests.reliability` (what `make reliability` runs).

Phases, each against service processes it starts on a throwaway PostgreSQL cluster of its own:
soak (many clients, a mixed load, several service processes), crash (kill -9 of service processes under
load), dbfault (immediate stops of PostgreSQL under load) and hostile (hypothesis-generated bodies, slow,
idle and oversized clients). Every invariant is then checked from the database. Sizes: see --help.
"""
