"""A backend's own 4xx reaches the client in OpenAI's error shape, whole or asked as a stream:
as it is when the engine already speaks it (llama.cpp, vLLM today: its extra fields kept),
rebuilt around its message when it does not (TGI, vLLM before its errors nested, plain text).

Real parts: the gateway through its real socket, and a backend on a loopback port answering
each engine's error exactly as that engine writes it (TGI and old vLLM cannot run here).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import h11
import httpx2
import pytest
import trio

from scheduler.openai.errors import MAX_MESSAGE_CHARS, openai_error_body
from tests.conftest import gateway_settings, start_gateway
from tests.support.h11_server import read_request

KEY = "sk-demo-enterprise"
LLAMA = (
    b'{"error":{"code":400,"message":"the request exceeds the available context size, try '
    b'increasing it","type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}'
)
ERRORS: dict[str, tuple[int, str, bytes]] = {  # the prompt picks one: status, type, body
    "tgi": (
        422,
        "application/json",
        b'{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= '
        b'4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`","error_type":"validation"}',
    ),
    "vllm-0.6": (
        400,
        "application/json",
        b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.",'
        b'"type":"BadRequestError","param":null,"code":400}',
    ),
    "text": (404, "text/plain", b"404: Not Found"),
    "llama": (400, "application/json; charset=utf-8", LLAMA),
}


async def serve_errors(stream: trio.SocketStream) -> None:
    """GET (the probes): 200; POST: the error its prompt names."""
    conn = h11.Connection(h11.SERVER)
    while (read := await read_request(conn, stream)) is not None:
        event, body = read
        if event.method == b"GET":
            status, content_type, answer = 200, "application/json", b'{"data": []}'
        else:
            status, content_type, answer = ERRORS[json.loads(body)["messages"][0]["content"]]
        head = [("content-type", content_type), ("content-length", str(len(answer)))]
        out = conn.send(h11.Response(status_code=status, headers=head)) or b""
        out += conn.send(h11.Data(data=answer)) or b""
        await stream.send_all(out + (conn.send(h11.EndOfMessage()) or b""))
        conn.start_next_cycle()


@pytest.fixture
async def gateway(nursery: trio.Nursery, redis_url: str) -> str:
    listeners = await nursery.start(partial(trio.serve_tcp, serve_errors, 0, host="127.0.0.1"))
    backend = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return await start_gateway(nursery, gateway_settings(backend, redis_url))


async def ask(gateway: str, case: str, *, stream: bool) -> httpx2.Response:
    body = {"model": "demo-small", "messages": [{"role": "user", "content": case}]}
    async with httpx2.AsyncClient(timeout=10) as client:
        return await client.post(
            gateway + "/v1/chat/completions",
            json={**body, "stream": stream},
            headers={"authorization": f"Bearer {KEY}"},
        )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("case", "message", "type", "code"),
    [
        ("tgi", "Input validation error: `inputs` tokens", "validation", None),
        ("vllm-0.6", "This model's maximum context length", "BadRequestError", "400"),
        ("text", "404: Not Found", "invalid_request_error", None),
    ],
)
async def test_an_engines_own_error_is_rebuilt_in_openai_shape(
    gateway: str, case: str, message: str, type: str, code: str | None, stream: bool
) -> None:
    with trio.fail_after(10):
        response = await ask(gateway, case, stream=stream)
    assert response.status_code == ERRORS[case][0]
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"].startswith(message) and error["type"] == type, error
    assert error["code"] == code and error["param"] is None, error


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_already_in_openai_shape_passes_untouched(
    gateway: str, stream: bool
) -> None:
    with trio.fail_after(10):
        response = await ask(gateway, "llama", stream=stream)
    assert (response.status_code, response.content) == (400, LLAMA)
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The backend answered 418."),
        (b"\xff\xfe not text", "\ufffd\ufffd not text"),
        (b'["a", "list"]', '["a", "list"]'),
        (b'{"error": {"no": "message"}}', '{"error": {"no": "message"}}'),
        (b"x" * 5000, "x" * MAX_MESSAGE_CHARS),
    ],
)
def test_any_other_body_becomes_the_message(body: bytes, message: str) -> None:
    error = json.loads(openai_error_body(418, body))["error"]
    assert error == {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
