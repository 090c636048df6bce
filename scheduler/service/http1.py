"""HTTP/1.1 where hypercorn and h11 are looser than RFC 9112 or than our clients need.

Seven changes, each in the one place that decides it (private names of hypercorn and h11, so
`tests/service/test_http_surface.py` and `tests/service/test_keepalive.py` fail if an upgrade
moves them; `install` then logs a warning and leaves that part as it was):

- Refusals before the app: h11 refuses a request whose request line or headers break RFC 9112
  (raw non-ASCII bytes in the path, a bare CR in a header, headers past the size limit), and
  hypercorn answers by itself, with an empty body, because the request never becomes an ASGI
  request. Its answer (`H11Protocol._send_error_response`) gets an OpenAI-shaped JSON body; the
  status and the closing of the connection stay hypercorn's.
- Bare LF: h11 takes a lone LF for a line end in the request head (RFC 9112 section 2.2 allows
  that, but a proxy in front that does not would see other headers than we do: request
  smuggling's raw material). A request head with a bare LF is refused: 400, connection closed.
  Bodies are not looked at (they may hold any byte); chunked trailers keep h11's leniency.
- Half-close: a client that sends its request and then shuts its sending side (`shutdown(WR)`,
  `nc -N`) is still answered. hypercorn read the end of file as "client gone" and cancelled the
  request; now, with a request being answered, the client is probed (see
  `_answer_while_only_half_closed`): one that only half-closed gets its answer, then the
  connection closes; one that is gone is still noticed at once, and its request cancelled.
- Closed idle connections: a client closing an idle keep-alive connection is let go at once
  (its socket and memory freed) instead of when hypercorn's keep-alive wait runs out.
- The client gone, told at once: hypercorn tells an ASGI app that its client went away only
  by an `http.disconnect` message for it to receive, so an app that is busy elsewhere (waiting
  in the queue, on a backend) needs a task of its own just to wait for that message (a nursery
  and a task per request: ~30 us). An app that puts a callable in its scope's extensions under
  `ON_DISCONNECT` has it called as the message is handed over (`_spawn_app_telling_gone`),
  and cancels its own work from there.
- A whole answer in one write: hypercorn writes a response's head, its body and its end
  (`b""` for a body framed by `Content-Length`) as three socket writes, each under the
  connection's send lock: three lock round trips, two or three writes and as many yields to
  trio's scheduler per answer. A head with `Content-Length` is now held and written with the
  body (`_send_h11_event_coalescing`), and an empty write is not made, so a whole answer is
  one write; a streamed (chunked) head still goes at once, and every chunk as it comes.
- Fewer yields per request. Each yield to trio's scheduler waits for every other runnable
  task to take its turn; when answers come back in a wave (hundreds of requests sent
  together to a backend that answers in about the same time), a turn lasts tens of
  milliseconds, and a request that yields fifteen times shares the wave's whole time instead
  of being done with its own part (processor sharing). So: the keep-alive timer that
  hypercorn restarted after every answer (a task started, and cancelled by the next request)
  is one task per connection whose deadline moves (`_IdleTimer`); the request's messages
  (body, end, disconnect) are handed to the app without a yield when its queue has room;
  `next_message` lets the app take a message that is already there without one; and a write
  takes the connection's send lock without a yield when it is free and, when the socket takes
  it whole, is made without one (`_protocol_send_taking_a_free_lock`): a stream's chunk
  costs its task one step (the wait for the backend's next bytes) instead of two.
"""

from __future__ import annotations

import logging
import math
import re
import socket
from collections.abc import Callable
from itertools import chain
from typing import Any

import h11
import trio
from h11 import _readers
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import tcp_server
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from backends import eager
from scheduler.openai.errors import ApiError

log = logging.getLogger("scheduler.service")
_MESSAGES = {
    400: "The request is not valid HTTP/1.1 (request line or headers).",
    431: "The request's headers are too large.",
}


def error_body(status: int) -> bytes:
    """The JSON body sent for a request refused at the HTTP level with `status`."""
    message = _MESSAGES.get(status, "The request is not valid HTTP/1.1.")
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message, type=kind).body()


async def _send_json_error_response(self: H11Protocol, status_code: int) -> None:
    body = error_body(status_code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    response = h11.Response(
        status_code=status_code, headers=list(chain(headers, self.config.response_headers("h11")))
    )
    await self._send_h11_event(response)
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


ON_DISCONNECT = "scheduler.on_disconnect"  # the scope extension called when the client goes
_RESET_POLL_S = 0.05  # how often a half-closed connection is checked for the client's reset
_BLANK_LINE = re.compile(b"\n\r?\n")
_read_request_head: Callable[[Any], h11.Request | None] = _readers.maybe_read_from_IDLE_client


def _strict_request_head(buf: Any) -> h11.Request | None:
    """h11's reader of a request head, refusing a bare LF in it."""
    data = bytes(buf)
    end = _BLANK_LINE.search(data)
    if end is not None and data.count(b"\n", 0, end.end()) != data.count(b"\r\n", 0, end.end()):
        # a LF that is not part of a CRLF
        raise h11.LocalProtocolError("bare LF in the request head", error_status_hint=400)
    head: h11.Request | None = _read_request_head(buf)
    return head


async def _read_data_until_closed(self: TCPServer) -> None:
    """The read loop below, then hypercorn's keep-alive wait stopped: it runs in the
    connection's nursery, so a client that closed an idle keep-alive connection would
    otherwise leave its socket and its memory held until `keep_alive_timeout` (75 s)."""
    await _read_data_answering_half_closed(self)
    await self.idle_task.stop()


async def _read_data_answering_half_closed(self: TCPServer) -> None:
    """hypercorn's read loop, except at end of file while a request is being answered."""
    while True:
        try:
            with trio.fail_after(self.config.read_timeout or math.inf):
                data = await self.stream.receive_some(MAX_RECV)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
            break
        await self.protocol.handle(RawData(bytes(data)))
        if data == b"":
            inner = getattr(self.protocol, "protocol", None)
            if (
                isinstance(inner, H11Protocol)
                and inner.stream is not None
                and await _answer_while_only_half_closed(self, inner)
            ):
                return  # answered; `H11Protocol._maybe_recycle` then closes
            break
    await self.protocol.handle(Closed())


async def _answer_while_only_half_closed(server: TCPServer, protocol: H11Protocol) -> bool:
    """End of file with a request being answered: the client either only stopped sending
    (half-close) or closed its socket (gone: the request is to be cancelled, which frees its
    seat and its backend). TCP shows both as the same FIN; the difference shows when data
    reaches the client: a closed socket answers it with a reset. So the client gets an interim
    `100 Continue` (every HTTP/1.1 client must accept an unexpected 1xx), and the socket is
    watched for that reset (every `_RESET_POLL_S`) until the answer is done. Returns False
    when the client is gone."""
    connection = protocol.connection
    if not isinstance(connection, h11.Connection) or connection.their_http_version != b"1.1":
        return False  # HTTP/1.0 gets no 1xx: its end of file is taken for "gone"
    try:
        if connection.our_state is h11.SEND_RESPONSE:  # else the answer's own bytes probe
            await protocol._send_h11_event(h11.InformationalResponse(status_code=100, headers=[]))
        while protocol.stream is not None:
            # a reset is not seen by reads (they keep seeing the end of file) but is left as
            # the socket's pending error
            if server.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            await trio.sleep(_RESET_POLL_S)
    except trio.ClosedResourceError:  # the answer is done, and the connection closed
        return True
    except (OSError, trio.BrokenResourceError):  # the reset: the client is gone
        return False
    return True


_send_h11_event = H11Protocol._send_h11_event
_HELD = "_scheduler_held_head"  # the head a protocol holds until its body is written


async def _send_h11_event_coalescing(self: H11Protocol, event: Any) -> None:
    """hypercorn's writing of one h11 event, a head with `Content-Length` held for its body
    and an empty write not made (hypercorn's own writing, and its error handling, once the
    client's side is broken)."""
    held: bytes = getattr(self, _HELD, b"")
    framed = isinstance(event, h11.Response) and any(
        name.lower() == b"content-length" for name, _ in event.headers
    )
    if self.connection.their_state is h11.ERROR:  # hypercorn's 400 path
        if held:
            setattr(self, _HELD, b"")
            await self.send(RawData(data=held))
        await _send_h11_event(self, event)
        return
    data = self.connection.send(event) or b""  # (hypercorn re-raises its errors here too)
    if framed:
        setattr(self, _HELD, data)
        return
    if held:
        setattr(self, _HELD, b"")
        data = held + data
    if data:
        await self.send(RawData(data=data))


_protocol_send = TCPServer.protocol_send


async def _protocol_send_taking_a_free_lock(self: TCPServer, event: Any) -> None:
    """hypercorn's `protocol_send`, the send lock taken at once when nobody holds it, a write
    that the socket takes whole made without a yield, and the keep-alive timer moved, not
    restarted (`_IdleTimer`)."""
    if isinstance(event, Updated) and isinstance(self.idle_task, _IdleTimer):
        if event.idle:
            self.idle_task.idle()
        else:
            self.idle_task.busy()
        return
    if not isinstance(event, RawData):
        await _protocol_send(self, event)
        return
    lock = self.send_lock
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        data = event.data
        # a plain socket's write (not TLS): what it takes at once costs no yield, the
        # rest (a full buffer) waits in `send_all`
        sent = eager.write_nowait(self.stream, data)
        if sent < len(data):
            with trio.CancelScope(shield=True):
                await self.stream.send_all(memoryview(data)[sent:] if sent else data)
    # OSError: `write_nowait` on a connection the client broke (EPIPE, ECONNRESET)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await self.protocol.handle(Closed())
    finally:
        lock.release()


_spawn_app = TaskGroup.spawn_app
_TrioSingleTask = getattr(tcp_server, "TrioSingleTask", None)


async def _spawn_app_telling_gone(
    self: TaskGroup, app: Any, config: Any, scope: Any, send: Any
) -> Callable[[Any], Any]:
    """hypercorn's spawning of the app, its message channel wrapped: an `http.disconnect`
    calls the scope's `ON_DISCONNECT` extension first, if the app put one there."""
    put = await _spawn_app(self, app, config, scope, send)
    extensions = scope.get("extensions")
    channel = getattr(put, "__self__", None)  # the app's message queue (a memory channel)
    if extensions is None or not isinstance(channel, trio.MemorySendChannel):
        return put

    async def put_telling_gone(message: Any) -> None:
        if message["type"] == "http.disconnect":
            on_disconnect = extensions.get(ON_DISCONNECT)
            if on_disconnect is not None:
                on_disconnect()
        try:
            channel.send_nowait(message)  # no yield while the queue has room
        except trio.WouldBlock:
            await put(message)

    return put_telling_gone


async def next_message(receive: Callable[[], Any]) -> Any:
    """The app's next ASGI message: one already queued is taken without a yield."""
    channel = getattr(receive, "__self__", None)
    if isinstance(channel, trio.MemoryReceiveChannel):
        try:
            return channel.receive_nowait()
        except trio.WouldBlock:
            pass
    return await receive()


class _IdleTimer:
    """hypercorn's keep-alive timer (its `TrioSingleTask`, which started a task on every
    answer and cancelled it on the next request: a spawn and two task steps per request) as
    one task per connection: an answer moves its deadline `keep_alive_timeout` ahead, a
    request puts it off (`busy`), and it closes the connection only when a deadline passes
    while idle. A worker that is terminated closes its idle connections at once, and a busy
    one as soon as its answer is done, as hypercorn's did."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._idle_s = math.inf
        self._closing = False  # the worker is terminated: idle means closed now
        self._stopped = False

    async def restart(self, task_group: TaskGroup, action: Callable[[], Any]) -> None:
        """hypercorn's call as a connection opens: `action` is `TCPServer._idle_timeout`,
        whose server gives the timeout, the worker's termination and the close."""
        if self._scope is None:
            server: TCPServer = action.__self__  # type: ignore[attr-defined]
            self._scope = trio.CancelScope()
            self._idle_s = server.config.keep_alive_timeout
            task_group._nursery.start_soon(self._watch, server)  # type: ignore[union-attr]
        self.idle()

    def idle(self) -> None:
        if self._scope is not None:
            wait_s = 0.0 if self._closing else self._idle_s
            self._scope.deadline = trio.current_time() + wait_s

    def busy(self) -> None:
        if self._scope is not None:
            self._scope.deadline = math.inf

    async def stop(self) -> None:
        """The connection is done: the timer ends without closing anything."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def _watch(self, server: TCPServer) -> None:
        assert self._scope is not None
        with self._scope:
            await server.context.terminated.wait()
            self._closing = True
            if self._scope.deadline != math.inf:  # idle: close now
                self._scope.deadline = trio.current_time()
            await trio.sleep_forever()
        if not self._stopped:
            with trio.CancelScope(shield=True):
                await server._initiate_server_close()


def install() -> None:
    """Install the seven changes in this process (idempotent)."""
    if hasattr(H11Protocol, "_send_error_response"):
        H11Protocol._send_error_response = _send_json_error_response  # type: ignore[method-assign]
    else:
        log.warning("hypercorn changed: its HTTP-level 400s keep an empty body")
    if _readers.READERS.get((h11.CLIENT, h11.IDLE)) in (_read_request_head, _strict_request_head):
        _readers.READERS[(h11.CLIENT, h11.IDLE)] = _strict_request_head
    else:
        log.warning("h11 changed: bare LF in request heads is accepted")
    if hasattr(TCPServer, "_read_data"):
        TCPServer._read_data = _read_data_until_closed  # type: ignore[method-assign]
    else:
        log.warning("hypercorn changed: a half-closed request is not answered")
    # (a hypercorn that spawns apps otherwise fails the tests of a client that goes away)
    TaskGroup.spawn_app = _spawn_app_telling_gone  # type: ignore[method-assign]
    if H11Protocol._send_h11_event in (_send_h11_event, _send_h11_event_coalescing):
        H11Protocol._send_h11_event = _send_h11_event_coalescing  # type: ignore[method-assign]
    else:
        log.warning("hypercorn changed: a whole answer is written in several writes")
    TCPServer.protocol_send = _protocol_send_taking_a_free_lock  # type: ignore[method-assign]
    if getattr(tcp_server, "TrioSingleTask", None) in (_TrioSingleTask, _IdleTimer):
        tcp_server.TrioSingleTask = _IdleTimer  # type: ignore[assignment,attr-defined]
    else:
        log.warning("hypercorn changed: its keep-alive timer restarts as it did")
