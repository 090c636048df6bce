"""A connection of the pipeliner's own to one Redis server: a batch is one write, its replies
one read loop, in the pipeliner's task.

Why: through coredis a pipelined command costs ~30 us of this process's CPU, and its
connection hands the bytes to reader and writer tasks of its own (trio hops on every round
trip). The quota's scripts (EVALSHA, a take and a settle per request) are nearly all of the
gateway's Redis traffic, so the pipeliner sends them here, encoded and parsed by coredis's own
compiled packer and parser: a reply, or an error reply, is the object coredis would give
(`NoScriptError`, `ResponseError`, ...). Every other command, and everything on a Redis
Cluster (whose routing and redirects are coredis's), stays on coredis.

The connection is opened on first use with what the coredis client was given: its TLS
context, AUTH with its credentials, SELECT of its database, and for a Sentinel-managed master
the server the sentinels name as master at that moment. A round trip that fails or is cut
short (its timeout) closes the connection, whose replies are then out of step, and so does a
READONLY reply (the server is a replica now, after a failover); the next round trip opens a
new one. It speaks RESP2 (no HELLO): the scripts' replies are the same in both protocols.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import coredis
import coredis.exceptions
import trio
from coredis._packer import Packer
from coredis.connection import TCPLocation, UnixDomainSocketLocation
from coredis.parser import NotEnoughData, Parser
from coredis.pool import ConnectionPool, SentinelConnectionPool

from backends.eager import send_all_eagerly

RawCommand = tuple[bytes | str | int | float, ...]  # b"EVALSHA", sha, numkeys, *keys, *args
READ_BYTES = 65536


class RespConnection:
    """`round_trip` from one task at a time (the pipeliner's lane); `aclose` at the end."""

    def __init__(
        self,
        locate: Callable[[], Awaitable[TCPLocation | UnixDomainSocketLocation]],
        *,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        encoding: str = "utf-8",
    ) -> None:
        self._locate = locate
        self._ssl_context = ssl_context
        self._handshake: list[RawCommand] = []
        if password:
            self._handshake.append(
                (b"AUTH", username, password) if username else (b"AUTH", password)
            )
        if db:
            self._handshake.append((b"SELECT", db))
        self._packer = Packer(encoding)
        self._stream: trio.abc.Stream | None = None
        self._parser = Parser()

    @classmethod
    def for_client(cls, redis: coredis.Redis[Any]) -> RespConnection | None:
        """One to the server of a one-server or Sentinel coredis client (None for a Redis
        Cluster, or a pool this module does not know)."""
        pool = redis.connection_pool
        if isinstance(redis, coredis.RedisCluster) or redis.decode_responses:
            return None
        kwargs = pool.connection_kwargs
        config: dict[str, Any] = {
            "ssl_context": kwargs.get("ssl_context"),
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "db": kwargs.get("db") or 0,
            "encoding": pool.encoding,
        }
        if isinstance(pool, SentinelConnectionPool):
            return cls(pool.get_primary_location, **config)
        location = pool.location
        if type(pool) is not ConnectionPool or not isinstance(
            location, TCPLocation | UnixDomainSocketLocation
        ):
            return None

        async def fixed() -> TCPLocation | UnixDomainSocketLocation:
            return location

        return cls(fixed, **config)

    async def round_trip(self, commands: Sequence[RawCommand]) -> list[Any]:
        """Each command's reply, or the `RedisError` that Redis answered it with, in order;
        the connection's own failures (and cancellation) are raised."""
        stream = self._stream if self._stream is not None else await self._connect()
        self._stream = None  # given back once every reply is read
        try:
            replies = await self._exchange(stream, commands)
        except BaseException:
            await self._close(stream)
            raise
        if any(isinstance(r, coredis.exceptions.ReadOnlyError) for r in replies):
            await self._close(stream)  # a replica now: the next round trip asks again
        else:
            self._stream = stream
        return replies

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await self._close(stream)

    async def _connect(self) -> trio.abc.Stream:
        location = await self._locate()
        stream: trio.abc.Stream
        if isinstance(location, UnixDomainSocketLocation):
            stream = await trio.open_unix_socket(location.path)
        elif self._ssl_context is not None:
            stream = await trio.open_ssl_over_tcp_stream(
                location.host, location.port, ssl_context=self._ssl_context
            )
        else:
            stream = await trio.open_tcp_stream(location.host, location.port)
        if self._handshake:
            try:
                replies = await self._exchange(stream, self._handshake)
                for reply in replies:
                    if isinstance(reply, coredis.exceptions.RedisError):
                        raise reply
            except BaseException:
                await self._close(stream)
                raise
        return stream

    async def _exchange(self, stream: trio.abc.Stream, commands: Sequence[RawCommand]) -> list[Any]:
        # no yield for a write the socket takes: a round trip is then one step of this task
        # (the wait for the replies), and the commands queued behind it wait one turn less
        await send_all_eagerly(stream, b"".join(self._packer.pack_commands(list(commands))))
        parser, replies = self._parser, list[Any]()
        while len(replies) < len(commands):
            parsed = parser.parse(False, None)
            if isinstance(parsed, NotEnoughData):
                data = await stream.receive_some(READ_BYTES)
                if not data:
                    raise coredis.exceptions.ConnectionError("Redis closed the connection")
                parser.feed(bytes(data))
            else:
                replies.append(parsed[1])
        return replies

    async def _close(self, stream: trio.abc.Stream) -> None:
        self._parser = Parser()  # what the old connection left unread goes with it
        await trio.aclose_forcefully(stream)
