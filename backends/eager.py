"""A write that yields to trio's scheduler only when the socket cannot take it whole.

Why: trio's `send_all` ends every write with a yield (a checkpoint), even one the socket
took at once, and each yield waits for every other runnable task to take its turn. When
hundreds of requests move together (500 clients in front of a backend answering each in
500 ms: the answers come back in waves), a turn lasts tens of milliseconds, and a request pays
one at every yield of its path; the Redis pipeliner pays it on every round trip, and every
request queued behind that round trip with it (bench/RESULTS.md, "500 clients"). The
gateway's writes to its clients make the same write (`write_nowait`, from
`scheduler.service.http1`).

The write is made at once on a plain socket (TLS goes through `send_all`); what the socket
does not take, and any other stream, goes through `send_all`, which waits. A cancelled task
is cancelled before anything is written, as by `send_all`. A broken connection raises the
socket's `OSError` (EPIPE, ECONNRESET), which the callers already translate as they do
`send_all`'s errors.
"""

from __future__ import annotations

import os

import trio


def write_nowait(stream: trio.abc.Stream, data: bytes) -> int:
    """How much of `data` a plain socket takes at once, written without a yield (0 when its
    buffer is full, and for any other stream); a broken connection raises the `OSError`."""
    if not isinstance(stream, trio.SocketStream):
        return 0
    try:
        return os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        return 0


async def send_all_eagerly(stream: trio.abc.Stream, data: bytes) -> None:
    """`stream.send_all(data)`, without its yield when the socket takes `data` whole."""
    await trio.lowlevel.checkpoint_if_cancelled()  # no yield unless cancelled
    sent = write_nowait(stream, data)
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:] if sent else data)
