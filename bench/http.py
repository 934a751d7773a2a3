"""A minimal keep-alive HTTP/1.1 client for pre-encoded requests: it writes the bytes it is given and
reads a Content-Length response, so the load generator costs a fraction of a full client's CPU."""

from __future__ import annotations

import asyncio


class ProtocolError(Exception):
    pass


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes | bytearray) -> tuple[int, bytes]:
        """Sends one request and returns (status, body); reconnects once when the server closed the line."""
        if self.writer is None:
            await self.open()
        self.writer.write(data)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.close()
            await self.open()
            self.writer.write(data)
            head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 "):
            raise ProtocolError(head[:80])
        status = int(head[9:12])
        lowered = head.lower()
        at = lowered.find(b"\r\ncontent-length:")
        if at < 0:
            raise ProtocolError(b"no Content-Length: " + head[:200])
        end = lowered.index(b"\r\n", at + 2)
        body = await self.reader.readexactly(int(lowered[at + 17 : end]))
        if b"\r\nconnection: close" in lowered:
            self.close()
        return status, body
