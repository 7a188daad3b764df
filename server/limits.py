"""Connection and request limits of the HTTP server: what one slow, idle or greedy client can hold.

    idle / slow headers   aiohttp's keep-alive timer (``web.Application(handler_args=...)``) starts when a
                          connection opens and again after each response; a connection whose next request's
                          headers are not all in by then (nothing sent, or half a request line and a stall:
                          slowloris) is closed: ``ServerConfig.idle_timeout_s``, 15 s (aiohttp's default is
                          3630 s). Bytes dribbled in do not extend it.
    slow bodies           every read of a request body waits ``body_timeout_s`` (30 s) at most for the next bytes,
                          then the request is answered 408 (:func:`read_within`), and the connection closed
                          after ``LINGER_S`` (2 s; aiohttp's default lingers 10 s reading the rest of a body
                          answered early, so that the client sees the answer).
    connections           at most ``max_connections`` (256) open at once; one more is answered at once with a
                          503 and ``Connection: close`` before its request is read (:class:`LimitedSite`), so
                          the connections already open (a page's keep-alive, a monitor's /healthz) go on.
    control requests      POST /sessions/{id}/interrupt and /end_of_segment: 20 a second per session,
                          bursts of 50 (:class:`TokenBucket`), 429 with Retry-After beyond; the WebSocket's
                          control messages use the same bucket's parameters, per socket.
    clients that leave    a client gone mid-request (its body cut, or gone before the answer) is one info line
                          (:func:`client_gone_middleware`), never an aiohttp traceback.
    malformed HTTP        aiohttp answers a broken request line, header or Content-Length 400 and logs an ERROR
                          with a traceback: any client could fill the log with them. :func:`quiet_bad_requests`
                          turns those into one info line (real handler errors keep their traceback).

WebSockets are not idle-timed (a pushed-audio socket may wait silently for the next reply): they are
capped per session (2) and pinged every 30 s, so a dead peer's socket closes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from engine.aio import wait_bounded

log = logging.getLogger("avatar.server")

T = TypeVar("T")

LINGER_S = 2.0  # after answering a request whose body was not all read (408, 413, ...), read on this long, then close


class TokenBucket:
    """``rate_per_s`` sustained, ``burst`` at once: ``take()`` is True while a token is left."""

    def __init__(self, rate_per_s: float, burst: int):
        if not (rate_per_s > 0 and burst >= 1):
            raise ValueError(f"need rate_per_s > 0 and burst >= 1, got {rate_per_s} and {burst}")
        self.rate_per_s, self.burst = float(rate_per_s), int(burst)
        self.tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait_s(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)


def _error_body(message: str) -> str:
    return json.dumps({"error": message})


async def read_within(aw: Awaitable[T], timeout_s: float, what: str = "the request body") -> T:
    """One read of a client's body, waiting ``timeout_s`` at most (408 Request Timeout beyond)."""
    finished, result = await wait_bounded(aw, timeout_s)
    if not finished:
        raise web.HTTPRequestTimeout(text=_error_body(f"{what} stalled: no bytes for {timeout_s:g} s"),
                                     content_type="application/json", headers={"Connection": "close"})
    return result


async def body_chunks(request: web.Request, chunk_bytes: int, timeout_s: float):
    """``request.content.iter_chunked(chunk_bytes)``, each read waiting ``timeout_s`` at most (408)."""
    while True:
        chunk = await read_within(request.content.read(chunk_bytes), timeout_s)
        if not chunk:
            return
        yield chunk


@web.middleware
async def client_gone_middleware(request: web.Request, handler):
    """A client that leaves mid-request (its connection reset while its body is read, or before the
    answer is written) is one info line; the answer, which nobody reads, is a plain 400."""
    try:
        return await handler(request)
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one too
        log.info("%s %s: the client left before the request was done", request.method, request.path)
        return web.Response(status=400, text="the client left")


class _BadRequestFilter(logging.Filter):
    """aiohttp.server's "Error handling request" for a request that did not parse: one info line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            message = str(exc.message).strip().splitlines()[0][:160] if exc.message else type(exc).__name__
            log.info("a malformed HTTP request answered %s: %s", exc.code or 400, message)
            return False
        return True


def quiet_bad_requests() -> None:
    """Install the filter on aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestFilter) for f in logger.filters):
        logger.addFilter(_BadRequestFilter())


# -- the connection cap -------------------------------------------------------------------------

class _Gate:
    """Connections open now (counted from their protocol's creation to its ``connection_lost``)."""

    def __init__(self, max_connections: int, retry_after_s: int):
        self.max_connections, self.retry_after_s = max_connections, retry_after_s
        self.open = 0
        self.refused = 0  # since the server started


class _Counted:
    """aiohttp's protocol (a RequestHandler) with the gate's count kept; every call passed through."""

    __slots__ = ("inner", "gate", "_lost")

    def __init__(self, inner: asyncio.Protocol, gate: _Gate):
        self.inner, self.gate, self._lost = inner, gate, False
        gate.open += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._lost:
            self._lost = True
            self.gate.open -= 1
        self.inner.connection_lost(exc)


class _Refusal(asyncio.Protocol):
    """One connection too many: a 503 written at once, then closed (the request is never read)."""

    def __init__(self, gate: _Gate):
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gate.refused += 1
        body = _error_body(f"too many connections: {self.gate.max_connections} are open; retry later").encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Retry-After: {self.gate.retry_after_s}\r\nConnection: close\r\n\r\n").encode()
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(head + body)
        transport.close()  # after the write is flushed

    def data_received(self, data: bytes) -> None:
        pass  # the request of a refused connection is not read


class LimitedSite(web.TCPSite):
    """``web.TCPSite`` with a cap on the connections open at once (``max_connections``): one more
    is answered 503 (Retry-After: ``retry_after_s``) and closed, the open ones are untouched."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int, retry_after_s: int = 1):
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        super().__init__(runner, host, port)
        self.gate = _Gate(max_connections, retry_after_s)

    def _protocol(self) -> Any:
        if self.gate.open >= self.gate.max_connections:
            return _Refusal(self.gate)
        server = self._runner.server
        assert server is not None
        return _Counted(server(), self.gate)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, backlog=self._backlog,
                                                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        if hasattr(self, "_bound_port"):  # aiohttp >= 3.10: TCPSite.port
            self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
