"""Abusive clients at the socket level: slowloris, idle connections, oversized and compressed-bomb bodies.

The service must stay up, answer these without a 5xx, and keep serving well-behaved clients meanwhile.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from dataclasses import dataclass, field

import aiohttp

MIB = 1024 * 1024


def post_head(authorization: bytes) -> bytes:
    """The start of a POST of JSON with this Authorization header; the rest of the headers follow it."""
    return (
        b"POST /bulk_transfer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
        + authorization
        + b"\r\n"
    )


@dataclass
class AbuseResult:
    figures: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


async def _read_status(reader: asyncio.StreamReader, within: float) -> int | None:
    try:
        line = await asyncio.wait_for(reader.readline(), within)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return None
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def _raw_post(port: int, head: bytes, body_chunks, within: float = 60) -> int | None:
    """Writes `head` then each chunk (stopping if the server closes), and returns the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for chunk in body_chunks:
            try:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), within)
            except (OSError, TimeoutError):
                break  # the server answered and closed early: read what it said
        return await _read_status(reader, within)
    finally:
        writer.close()


def _chunks(total: int, size: int = MIB):
    sent = 0
    piece = b"9" * size
    while sent < total:
        n = min(size, total - sent)
        yield piece[:n]
        sent += n


async def oversized(port: int, limit_bytes: int, authorization: bytes) -> AbuseResult:
    """A body over the limit (plain and chunked), a gzip bomb, a huge Content-Length never sent, each with a
    valid key (so that each is refused for what it is, not for a missing key)."""
    result = AbuseResult()
    size = limit_bytes + MIB
    head = post_head(authorization) + f"Content-Length: {size}\r\n\r\n".encode()
    status = await _raw_post(port, head, _chunks(size))
    result.figures["oversized body"] = status
    if status != 413:
        result.problems.append(f"body of {size} bytes: HTTP {status}, expected 413")

    def chunked():
        for piece in _chunks(size):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    head = post_head(authorization) + b"Transfer-Encoding: chunked\r\n\r\n"
    status = await _raw_post(port, head, chunked())
    result.figures["oversized chunked body"] = status
    if status != 413:
        result.problems.append(f"chunked body of {size} bytes: HTTP {status}, expected 413")

    bomb = gzip.compress(b'{"a":"' + b"0" * (4 * limit_bytes) + b'"}', compresslevel=9)
    head = post_head(authorization) + f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n".encode()
    status = await _raw_post(port, head, [bomb])
    result.figures["gzip bomb"] = f"{len(bomb)} B -> {4 * limit_bytes} B: {status}"
    if status is None or status >= 500:
        result.problems.append(f"gzip bomb ({len(bomb)} bytes, {4 * limit_bytes} inflated): HTTP {status}")

    # A body that is not what its Content-Encoding says, past the first reads: gzip is read and refused (400),
    # deflate is not accepted at all (415).
    for encoding, expected in (("gzip", 400), ("deflate", 415)):
        body = b"[" * 100_000 + b"]" * 100_000
        head = (
            post_head(authorization) + f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        status = await _raw_post(port, head, [body], within=10)
        result.figures[f"200 KB body not {encoding}"] = status
        if status != expected:
            result.problems.append(
                f"a 200 KB body sent as Content-Encoding: {encoding} but not encoded: "
                + (f"HTTP {status}, expected {expected}" if status else "no answer in 10 s (connection left open)")
            )

    head = post_head(authorization) + b"Content-Length: 1000000000000\r\n\r\n"
    status = await _raw_post(port, head, [b'{"organization_iban": "'], within=2)
    result.figures["huge Content-Length, body never sent"] = status
    if status is not None and status >= 500:
        result.problems.append(f"Content-Length 10^12 with a short body: HTTP {status}")
    return result


async def slow_and_idle(
    port: int,
    valid_bodies,
    authorization: bytes,
    *,
    idle: int,
    slow: int,
    seconds: float,
    max_latency: float,
    drip_interval: float = 0.5,
) -> AbuseResult:
    """`idle` connections that send nothing, `slow` slowloris connections dripping headers or a body byte by
    byte, while a well-behaved client keeps sending valid requests: they must all be answered, promptly."""
    result = AbuseResult()
    holders: list[asyncio.StreamWriter] = []
    opened = 0
    for _ in range(idle):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            holders.append(writer)
            opened += 1
        except OSError as error:
            result.problems.append(f"could not open idle connection {opened + 1}: {error}")
            break
    result.figures["idle connections held"] = opened
    stop = asyncio.Event()
    dripped = 0

    async def slowloris(i: int) -> None:
        nonlocal dripped
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        holders.append(writer)
        if i % 2:
            writer.write(b"POST /bulk_transfer HTTP/1.1\r\nHost: x\r\n")
            drip = (f"X-Slow-{n}: {'a' * 10}\r\n".encode() for n in range(10_000))
        else:
            body = json.dumps({"organization_iban": "x" * 5000}).encode()
            writer.write(
                b"POST /bulk_transfer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            drip = (body[n : n + 1] for n in range(len(body)))
        for piece in drip:
            if stop.is_set():
                return
            try:
                writer.write(piece)
                await writer.drain()
                dripped += 1
            except OSError:
                return
            try:
                await asyncio.wait_for(stop.wait(), drip_interval)
            except TimeoutError:
                pass

    slow_tasks = [asyncio.create_task(slowloris(i)) for i in range(slow)]
    latencies = []
    statuses = {}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        bodies = iter(valid_bodies)
        while time.monotonic() < deadline:
            body = next(bodies)
            started = time.monotonic()
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/bulk_transfer",
                    data=body,
                    headers={"Content-Type": "application/json", "Authorization": authorization.decode()},
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as error:
                statuses[type(error).__name__] = statuses.get(type(error).__name__, 0) + 1
            latencies.append(time.monotonic() - started)
    stop.set()
    await asyncio.gather(*slow_tasks, return_exceptions=True)
    for writer in holders:
        writer.close()
    latencies.sort()
    worst = latencies[-1] if latencies else 0.0
    result.figures.update(
        {
            "slowloris connections": slow,
            "slow bytes dripped": dripped,
            "requests served meanwhile": sum(v for k, v in statuses.items() if k == 201),
            "worst latency meanwhile (s)": round(worst, 3),
        }
    )
    if set(statuses) != {201}:
        result.problems.append(f"well-behaved client got {statuses} while slow and idle clients were connected")
    if not latencies or worst > max_latency:
        result.problems.append(f"well-behaved client waited {worst:.2f}s (limit {max_latency}s)")
    return result
