"""A small websocket client over a real socket (wsproto), for the uvicorn websocket tests.

It sees what a browser would: a denied handshake's HTTP status, headers and body, close
codes and reasons, and it can drop the TCP connection without a close frame (1006 for the
server).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

TIMEOUT = 10.0


@dataclass
class Rejected:
    """A handshake the server refused with an HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Closed:
    """A close frame the server sent."""

    code: int
    reason: str


@dataclass
class WsClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: WSConnection = field(default_factory=lambda: WSConnection(ConnectionType.CLIENT))
    pending: list[Event] = field(default_factory=list)

    async def _event(self) -> Event:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            self.conn.receive_data(data or None)
            self.pending.extend(self.conn.events())
            if not data and not self.pending:
                raise ConnectionError("the server closed the TCP connection")
        return self.pending.pop(0)

    async def handshake(self, target: str, headers: dict[str, str]) -> Rejected | None:
        """Open the websocket; ``None`` when accepted, else the HTTP refusal."""
        host = self.writer.get_extra_info("peername")[0]
        extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.writer.write(self.conn.send(Request(host=host, target=target, extra_headers=extra)))
        await self.writer.drain()
        event = await self._event()
        if isinstance(event, AcceptConnection):
            return None
        assert isinstance(event, RejectConnection), event
        rejected = Rejected(event.status_code, {k.decode(): v.decode() for k, v in event.headers})
        while event.has_body:
            data = await self._event()
            assert isinstance(data, RejectData)
            rejected.body += data.data
            if data.body_finished:
                break
        return rejected

    async def send_text(self, text: str) -> None:
        self.writer.write(self.conn.send(TextMessage(data=text)))
        await self.writer.drain()

    async def receive(self) -> str | bytes | Closed:
        """The next message, or the server's close (answered, as a client does)."""
        event = await self._event()
        if isinstance(event, TextMessage | BytesMessage):
            return event.data
        assert isinstance(event, CloseConnection), event
        with contextlib.suppress(Exception):
            self.writer.write(self.conn.send(event.response()))
            await self.writer.drain()
        return Closed(event.code, event.reason)

    async def close(self, code: int = 1000) -> None:
        """Close normally with ``code`` and wait for the server's close frame."""
        self.writer.write(self.conn.send(CloseConnection(code=code)))
        await self.writer.drain()
        while True:
            try:
                event = await self._event()
            except ConnectionError:
                return
            if isinstance(event, CloseConnection):
                return

    async def close_without_code(self) -> None:
        """Send a close frame with no status code (the server sees 1005)."""
        self.writer.write(self.conn.send(CloseConnection(code=CloseReason.NO_STATUS_RCVD)))
        await self.writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            while not isinstance(await self._event(), CloseConnection):
                pass

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (the server sees 1006)."""
        self.writer.transport.abort()


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[WsClient]:
    """A TCP connection to the server at ``url`` (``http://host:port``)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port), TIMEOUT
    )
    client = WsClient(reader, writer)
    try:
        yield client
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
