"""HTTP below aiohttp, for the tests that need the bytes: a reader that does not read, and
chunked transfer encoding undone by hand."""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit


async def open_stalled_reader(base: str, path: str) -> socket.socket:
    """A client that sends its GET and then does not read: a tiny receive window."""
    parts = urlsplit(base)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (parts.hostname, parts.port))
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def read_all(sock: socket.socket, timeout: float) -> bytes:
    """What `sock` receives until it closes or a block ends in the terminal COMPLETED."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []

    async def run() -> None:
        while True:
            chunk = await loop.sock_recv(sock, 1 << 16)
            if not chunk:
                return
            chunks.append(chunk)
            if b"COMPLETED" in chunk[-400:]:
                return

    await asyncio.wait_for(run(), timeout)
    return b"".join(chunks)


def dechunk(body: bytes) -> bytes:
    """A whole chunked body's bytes without the chunk framing."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
