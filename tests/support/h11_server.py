"""The reading half of the hand-written HTTP/1.1 servers that tests and benchmarks put in a
backend's place: one request at a time off a kept-alive connection, with h11.

Why one: each of those servers read its requests with the same loop (feed h11 until a whole
request is in, stop when the client closes); what they answer differs, and stays theirs.
"""

from __future__ import annotations

import h11
import trio

READ_SIZE = 65_536


async def read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """The next request on `conn` and its body, read off `stream`; None when the client
    closed the connection (before a request or within one) or h11 saw it end."""
    request, body = None, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None  # h11 gives the request before its end
            return request, bytes(body)
        else:  # h11.ConnectionClosed, h11.PAUSED: nothing more to read here
            return None
