"""A small HTTP/1.1 client for the gateway's hot path: POST /internal/generate over kept-alive
connections, the response handed over line by line as it arrives.

aiohttp's client spends ~250 us of CPU per request on this machine (URL objects, cookie jar,
trace hooks, timers, its stream reader), more than all the gateway's own work on a request.
This one writes each request with one send, parses the answer with httptools (the parser
uvicorn uses) and keeps idle connections per replica for the next request. It offers the
few members of aiohttp.ClientResponse that gateway/upstream.py uses (status, content.readline,
read, release, close), so the rest of the proxy cannot tell them apart.

Failures surface as OSError / TimeoutError, which upstream.py already sorts into "retry on
another replica" (before any answer) and "the stream broke" (after it started).

Nothing waits forever: the connections in use are known per replica, so the registry can fail
them all at once when a replica stops answering its /kv/events heartbeats (a hung process
keeps its sockets open; only a deadline notices it), and `sweep` fails any that has had no
byte for the idle deadline (a replica whose HTTP side lives on while its engine is stuck).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

_Address = tuple[str, int, str]  # host, port, Host header
_MAX_IDLE_PER_REPLICA = 256
# A response dropped right after its last frame still owes its end (the chunked terminator);
# waiting this long for it keeps the connection. Frames instead mean an abort: close at once.
_LINGER_S = 0.1


class ReplicaUnresponsive(ConnectionError):
    """The connection was failed on purpose: its replica hung, or it sat idle past the deadline.
    Unlike a reset idle connection, taking another connection to the same replica won't help."""


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() system call every time.
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self.last_byte_at = 0.0  # loop time of the last bytes received (or of the request sent)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.got_bytes = False
        self.keep_alive = True
        self.error: OSError | None = None
        self._body = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._linger: tuple[ReplicaConnections, _Address, asyncio.TimerHandle] | None = None

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_byte_at = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self.error = ConnectionResetError(f"bad HTTP from the replica: {err}")
            self.close()
        if self._linger is not None:
            self._lingered()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger[2].cancel()
            self._linger = None
        if not self.complete and self.error is None:
            if self.headers_done and not self.keep_alive and not exc:
                self.complete = True  # a body delimited by the connection's end
            else:
                self.error = ConnectionResetError(f"the replica closed the connection ({exc or 'EOF'})")
        self._wake()

    # ---- httptools callbacks ---------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.complete = True

    # ---- for ReplicaResponse ---------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Until more bytes, the end of the answer, or a failure."""
        if self.error is not None:
            raise self.error
        self._waiter = self._loop.create_future()
        await self._waiter
        self._waiter = None
        if self.error is not None:
            raise self.error

    def take_line(self) -> bytes | None:
        """A whole line from the body received so far (with its newline), or None."""
        end = self._body.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._body[: end + 1])
        del self._body[: end + 1]
        return line

    def take_lines(self) -> list[bytes]:
        """Every whole line received so far (without their newlines); [] when there is none."""
        end = self._body.rfind(b"\n")
        if end < 0:
            return []
        lines = bytes(self._body[:end]).split(b"\n")
        del self._body[: end + 1]
        return lines

    def has_unread(self) -> bool:
        return bool(self._body)

    def take_rest(self) -> bytes:
        rest = bytes(self._body)
        self._body.clear()
        return rest

    def linger(self, pool: ReplicaConnections, key: _Address) -> None:
        """Wait briefly for the end of an answer nobody reads any more, to reuse the connection."""
        timer = self._loop.call_later(_LINGER_S, self.close)
        self._linger = (pool, key, timer)

    def _lingered(self) -> None:
        assert self._linger is not None
        pool, key, timer = self._linger
        if self._body or self.closed:  # more frames: the request goes on, abort it
            timer.cancel()
            self._linger = None
            self.close()
        elif self.complete:
            timer.cancel()
            self._linger = None
            if self.keep_alive:
                pool.put(key, self)
            else:
                self.close()

    def fail(self, error: OSError) -> None:
        """End the exchange with `error` for whoever waits on it, and drop the connection."""
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger[2].cancel()
            self._linger = None
        if self.transport is not None:
            self.transport.close()


class ReplicaResponse:
    """What upstream.py reads of an answer (the subset of aiohttp.ClientResponse it uses)."""

    def __init__(self, pool: ReplicaConnections, key: _Address, connection: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.content = self  # aiohttp's `response.content.readline()`

    async def readline(self) -> bytes:
        """The next body line; b"" once the answer is over."""
        connection = self._connection
        if connection is None:
            return b""
        while True:
            line = connection.take_line()
            if line is not None:
                return line
            if connection.complete:
                rest = connection.take_rest()
                self.release()
                return rest
            await connection.wait()

    async def readlines(self) -> list[bytes]:
        """The body lines that have arrived (waits for one; newlines dropped); [] once it is over.

        One call for every frame a read brought in: a replica that sends several at once
        costs one wake-up here, not one per line."""
        connection = self._connection
        if connection is None:
            return []
        while True:
            lines = connection.take_lines()
            if lines:
                return lines
            if connection.complete:
                rest = connection.take_rest()
                self.release()
                return [rest] if rest else []
            await connection.wait()

    async def read(self) -> bytes:
        connection = self._connection
        if connection is None:
            return b""
        while not connection.complete:
            await connection.wait()
        body = connection.take_rest()
        self.release()
        return body

    def release(self) -> None:
        """Done with the answer: a connection read to its end goes back to the pool; one whose
        answer may be ending (nothing unread) lingers for its end; any other closes."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._pool.done(self._key, connection)
        if connection.closed or not connection.keep_alive:
            connection.close()
        elif connection.complete:
            self._pool.put(self._key, connection)
        elif connection.headers_done and not connection.has_unread():
            connection.linger(self._pool, self._key)
        else:
            connection.close()

    def close(self) -> None:
        """Drop the answer; closing an unfinished one aborts the request on the replica."""
        self.release()


class ReplicaConnections:
    """Idle keep-alive connections, per replica address, for one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._idle: dict[_Address, deque[_Connection]] = {}
        self._addresses: dict[str, tuple[_Address, str]] = {}
        # Connections carrying a request now, per replica: what `abort` and `sweep` look at.
        self._busy: dict[_Address, set[_Connection]] = {}

    def put(self, key: _Address, connection: _Connection) -> None:
        busy = self._busy.get(key)
        if busy is not None:
            busy.discard(connection)
        if connection.closed:
            return
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= _MAX_IDLE_PER_REPLICA:
            connection.close()
            return
        connection._reset()
        idle.append(connection)

    def _address(self, url: str) -> tuple[_Address, str]:
        known = self._addresses.get(url)
        if known is None:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            known = ((host, port, parts.netloc), parts.path or "/")
            self._addresses[url] = known
        return known

    async def _connect(self, key: _Address, timeout_s: float) -> _Connection:
        loop = self._loop
        transport, connection = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(loop), key[0], key[1]), timeout_s
        )
        connection.transport = transport  # uvloop calls connection_made only after this returns
        return connection

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        connect_timeout_s: float,
        while_waiting: Callable[[], None] | None = None,
    ) -> ReplicaResponse:
        """Send the request; returns once the answer's status and headers are in.

        `while_waiting` runs once, right after the request is written: work the caller can do
        while the replica works, instead of before sending (or not at all when sending fails)."""
        key, path = self._address(url)
        head = [f"POST {path} HTTP/1.1\r\nHost: {key[2]}\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
        request = "".join(head).encode("latin-1") + b"\r\n" + body
        idle = self._idle.get(key)
        while True:
            reused = bool(idle)
            if idle:
                connection = idle.pop()
                if connection.closed:
                    continue
            else:
                connection = await self._connect(key, connect_timeout_s)
            assert connection.transport is not None
            busy = self._busy.get(key)
            if busy is None:
                busy = self._busy[key] = set()
            busy.add(connection)
            connection.last_byte_at = self._loop.time()
            connection.transport.write(request)
            try:
                if while_waiting is not None:
                    while_waiting()
                    while_waiting = None
                while not connection.headers_done:
                    await connection.wait()
            except ReplicaUnresponsive:
                busy.discard(connection)
                raise
            except OSError:
                connection.close()
                busy.discard(connection)
                if reused and not connection.got_bytes:
                    continue  # the replica had closed that idle connection: take another one
                raise
            except BaseException:
                connection.close()
                busy.discard(connection)
                raise
            return ReplicaResponse(self, key, connection)

    def done(self, key: _Address, connection: _Connection) -> None:
        """A connection leaves its request without going back to the idle pool (closed)."""
        busy = self._busy.get(key)
        if busy is not None:
            busy.discard(connection)

    def abort(self, url: str, reason: str) -> int:
        """Fail every request in flight to `url` (its replica hung); returns how many."""
        key = self._address(url)[0]
        busy = self._busy.pop(key, set())
        for connection in busy:
            connection.fail(ReplicaUnresponsive(reason))
        for connection in self._idle.pop(key, ()):
            connection.close()
        return len(busy)

    def sweep(self, idle_deadline_s: float) -> int:
        """Fail requests that have had no byte from their replica for `idle_deadline_s`."""
        cutoff = self._loop.time() - idle_deadline_s
        failed = 0
        for busy in self._busy.values():
            stale = [c for c in busy if c.last_byte_at < cutoff]
            for connection in stale:
                busy.discard(connection)
                connection.fail(ReplicaUnresponsive(f"no answer from the replica for {idle_deadline_s:g} s"))
                failed += 1
        return failed

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReplicaConnections] = weakref.WeakKeyDictionary()


def connections() -> ReplicaConnections:
    """This event loop's pool (connections cannot move between loops)."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = ReplicaConnections(loop)
    return pool


async def close_connections() -> None:
    """Close this loop's idle connections (at shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        pool.close()
