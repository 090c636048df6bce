"""Bounded resources: a backend's whole answer past `backend_limits.max_response_bytes` is
refused with a 502, and the gateway's memory does not grow with it."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

import httpx2
import trio

from tests.conftest import start_gateway
from tests.service.test_quota_path import chat, settings_from

CONFIG = """
[backend_limits]
max_response_bytes = 1048576
[tiers.t]
weight = 1
[[keys]]
key = "{key}"
tenant = "t"
tier = "t"
[models.demo-small]
backends = ["{backend}"]
cache_fresh_s = 0
"""
HUGE_BYTES = 200 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def serve_huge_answers(stream: trio.SocketStream) -> None:
    """An OpenAI-ish backend whose every answer is a 200 of HUGE_BYTES (sent until the
    reader goes away); its probes (GET) get a small 200."""
    buffer = b""
    async with stream:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        if buffer.startswith(b"GET"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % HUGE_BYTES)
        chunk = b" " * 65536
        try:
            for _ in range(HUGE_BYTES // len(chunk)):
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            return


async def test_a_huge_whole_answer_is_a_502_and_memory_stays_flat(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, serve_huge_answers, 0, host="127.0.0.1")
    )
    backend = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    key = f"sk-{uuid.uuid4().hex}"
    text = CONFIG.format(key=key, backend=backend)
    gateway = await start_gateway(nursery, settings_from(tmp_path, text, backend, redis_url))
    auth = {"authorization": f"Bearer {key}"}
    before = rss_bytes()
    async with httpx2.AsyncClient(timeout=30) as client:
        with trio.fail_after(60):
            for _ in range(2):
                r = await client.post(gateway + "/v1/chat/completions", json=chat(), headers=auth)
                assert r.status_code == 502, r.text[:200]
                error = r.json()["error"]
                assert "max_response_bytes" in error["message"] and error["code"] == "bad_gateway"
    assert rss_bytes() - before < 32 * 1024 * 1024
