"""A write that yields to trio's scheduler only when the socket cannot take it whole.

Why: trio's `send_all` ends every write with a yield (a checkpoint), even one the socket
took at once, and each yield waits for every other runnable task to take its turn. When
hundreds of requests move together (500 clients in front of a backend answering each in
500 ms: the answers come back in waves), a turn lasts tens of milliseconds, and a request pays
one at every yield of its path; the Redis pipeliner pays it on every round trip, and every
request queued behind that round trip with it (bench/RESULTS.md, "500 clients"). The
gateway's writes to its clients do the same (`scheduler.service.http1`).

The write is made at once on a plain socket (TLS goes through `send_all`); what the socket
does not take, and any other stream, goes through `send_all`, which waits. A cancelled task
is cancelled before anything is written, as by `send_all`. A broken connection raises the
socket's `OSError` (EPIPE, ECONNRESET), which the callers already translate as they do
`send_all`'s errors.
"""

from __future__ import annotations

import os

import trio


async def send_all_eagerly(stream: trio.abc.Stream, data: bytes) -> None:
    """`stream.send_all(data)`, without its yield when the socket takes `data` whole."""
    await trio.lowlevel.checkpoint_if_cancelled()  # no yield unless cancelled
    sent = 0
    if isinstance(stream, trio.SocketStream):
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:] if sent else data)
