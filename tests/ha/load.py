"""An adapter over the reliability workload's clients: the same requests, retries and bookkeeping, plus the
time and answer of every attempt, from which the run measures each fault's recovery."""

from __future__ import annotations

import time

from tests.reliability.workload import Clients

from .timeline import Attempt


class TimedClients(Clients):
    """tests.reliability.workload.Clients, recording an Attempt per HTTP attempt in `attempts`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[Attempt] = []

    async def attempt(self, session, request):
        sent = time.monotonic()
        result = await super().attempt(session, request)
        status, code = result[0], result[1]
        self.attempts.append(Attempt(sent, time.monotonic(), status, code if isinstance(code, str) else None))
        return result
