"""Group commit: the bulk transfer requests a worker receives while its calls to the database are in flight go
together in its next call, one statement of bps_api.bulk_transfers that answers each as if it had come alone.

No timer: a request that finds a call slot free (max_calls of them, BPS_GROUP_MAX_CALLS) is sent at once,
alone; requests that arrive while every slot is busy queue, and the next slot to free up takes them all, up
to max_requests and max_bytes of bodies. So an idle service adds no latency, and a busy one makes fewer,
larger calls.
Nothing is answered before its call has committed. A call that fails other than by the database being
unavailable is made again one request at a time, in order, so one request (a body PostgreSQL cannot read as
JSON, say, or a deadlock) cannot fail the others: each then gets what its own call gave, or raised.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

RETRIED_ALONE = (asyncpg.DeadlockDetectedError,)


@dataclass(frozen=True, slots=True)
class Item:
    request_id: str
    api_key: str
    body: str
    idempotency_key: str | None


class Intake:
    def __init__(
        self,
        fetch: Callable[..., Awaitable],
        single_sql: str,
        group_sql: str,
        max_calls: int,
        max_requests: int,
        max_bytes: int,
        observe: Callable[[int], None] = lambda requests: None,
        retried: Callable[[], None] = lambda: None,
    ) -> None:
        # fetch(method, sql, *args): what connection.method gives on a pooled connection; None when the
        # database is unavailable (app.fetch_on).
        self.fetch = fetch
        self.single_sql = single_sql
        self.group_sql = group_sql
        self.max_calls = max_calls
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.observe = observe  # called with the size of each group sent
        self.retried = retried  # called when a group is sent again one by one
        self.queue: deque[tuple[Item, asyncio.Future]] = deque()
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()

    async def submit(self, item: Item) -> asyncpg.Record | None:
        """The answer row of the item's request (None: the database is unavailable)."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if self.in_flight < self.max_calls:
            self._dispatch()
        return await future

    def _dispatch(self) -> None:
        group = [self.queue.popleft()]
        size = len(group[0][0].body)
        while self.queue and len(group) < self.max_requests and size + len(self.queue[0][0].body) <= self.max_bytes:
            size += len(self.queue[0][0].body)
            group.append(self.queue.popleft())
        self.in_flight += 1
        task = asyncio.create_task(self._run(group))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, group: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            await self._answer(group)
        except Exception as error:  # a fault of ours: every request still waiting gets it (a 500)
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
        finally:
            self.in_flight -= 1
            if self.queue and self.in_flight < self.max_calls:
                self._dispatch()

    async def _answer(self, group: list[tuple[Item, asyncio.Future]]) -> None:
        self.observe(len(group))
        try:
            # A deadlock too is tried again request by request (see docs/design.md, Locking).
            rows = await self.fetch(
                "fetch", self.group_sql, *arguments([item for item, _ in group]), reraise=RETRIED_ALONE
            )
        except asyncpg.PostgresError:
            rows = False
            self.retried()
        if rows is not False:
            for (_, future), row in zip(group, rows if rows is not None else [None] * len(group), strict=True):
                settle(future, row)
            return
        for item, future in group:
            try:
                row = await self.fetch(
                    "fetchrow", self.single_sql, item.request_id, item.api_key, item.body, item.idempotency_key
                )
            except Exception as error:  # (the handler maps it, as for a request of its own)
                if not future.done():
                    future.set_exception(error)
            else:
                settle(future, row)


def arguments(items: list[Item]) -> tuple:
    """bps_api.bulk_transfers's: a label that names the session after the requests, then their columns."""
    label = items[0].request_id + (f" +{len(items) - 1}" if len(items) > 1 else "")
    return (
        label,
        [item.api_key for item in items],
        [item.body for item in items],
        [item.idempotency_key for item in items],
    )


def settle(future: asyncio.Future, row) -> None:
    if not future.done():  # (a client that went away stopped waiting; its request is answered all the same)
        future.set_result(row)
