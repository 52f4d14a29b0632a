"""The little HTTP/1.1 that the bench's load generator and loopback agency speak themselves, on
``asyncio.Protocol``. aiohttp stays the HTTP implementation of the product; these two only share the bench
machine's cores with the gateway they measure, so they must cost them as little as possible.

Messages are framed by Content-Length only (Transfer-Encoding is a ``ProtocolError``), and bodies are
counted off and dropped as they arrive: neither side needs them.
"""

from __future__ import annotations

import asyncio

MAX_HEAD = 64 * 1024
Headers = dict[bytes, bytes]  # lower-cased names; a repeated header keeps its last value


class ProtocolError(Exception):
    """A message this module does not read: a malformed or endless head, or a body not framed by Content-Length."""


def split_head(head: bytes) -> tuple[list[bytes], Headers]:
    """The first line's parts (split on the first two spaces) and the headers."""
    lines = head.split(b"\r\n")
    headers: Headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ProtocolError(f"not a header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return lines[0].split(b" ", 2), headers


def body_length(headers: Headers) -> int | None:
    """Content-Length, or None without one."""
    if b"transfer-encoding" in headers:
        raise ProtocolError(f"Transfer-Encoding {headers[b'transfer-encoding']!r}: Content-Length only")
    value = headers.get(b"content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise ProtocolError(f"Content-Length {value[:40]!r}")
    return int(value)


def keep_alive(version: bytes, headers: Headers) -> bool:
    tokens = headers.get(b"connection", b"").lower()
    return b"close" not in tokens and (version == b"HTTP/1.1" or b"keep-alive" in tokens)


class MessageStream(asyncio.Protocol):
    """Reads HTTP/1.x messages off a connection one after the other: ``head_received`` for each head returns
    how many body bytes follow (-1: an interim head, no body, the next head follows); ``message_received``
    once that body has been read. A ``ProtocolError`` from either, or from the framing, goes to
    ``protocol_error`` and nothing more is read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._remaining = -1  # body bytes still to read; -1 while reading a head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def head_received(self, first_line: list[bytes], headers: Headers) -> int:
        raise NotImplementedError

    def message_received(self) -> None:
        raise NotImplementedError

    def protocol_error(self, error: ProtocolError) -> None:
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._read()
        except ProtocolError as exc:
            self._buffer.clear()
            self._remaining = -1
            self.protocol_error(exc)

    def _read(self) -> None:
        buffer = self._buffer
        while (buffer or self._remaining >= 0) and not (self.transport is None or self.transport.is_closing()):
            if self._remaining < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise ProtocolError(f"no end of head in {MAX_HEAD} bytes")
                    return
                first_line, headers = split_head(bytes(buffer[:end]))
                del buffer[: end + 4]
                self._remaining = self.head_received(first_line, headers)
                continue
            if len(buffer) < self._remaining:  # count the body off as it comes
                self._remaining -= len(buffer)
                buffer.clear()
                return
            del buffer[: self._remaining]
            self._remaining = -1
            self.message_received()
