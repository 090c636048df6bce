"""The OpenAI surface's edges, on real sockets: `GET /v1/models/{model}` through the real
openai SDK, numbers that parse as infinity, nesting bounded at parse time, paths that are not
routes (doubled slashes, raw non-ASCII bytes), and the OpenAPI document of what is served."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx2
import openai
import pytest
import trio

from scheduler.openai.body import MAX_JSON_DEPTH
from scheduler.service.config import Settings
from tests.conftest import gateway_settings, start_demo, start_gateway

KEY = "sk-demo-enterprise"
MODEL = "demo-small"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TOKEN = "surface-admin-token"


async def serve(nursery: trio.Nursery, redis_url: str, *, admin: bool = False) -> str:
    settings: Settings = gateway_settings(await start_demo(nursery), redis_url)
    if admin:
        settings = dataclasses.replace(settings, admin_token=TOKEN)
    return await start_gateway(nursery, settings)


@pytest.fixture
async def url(nursery: trio.Nursery, redis_url: str) -> str:
    return await serve(nursery, redis_url)


async def post(url: str, body: bytes, path: str = "/v1/chat/completions") -> httpx2.Response:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            return await client.post(path, content=body, headers=headers)


def openai_error(response: httpx2.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def raw_exchange(url: str, request: bytes) -> tuple[bytes, bytes]:
    """One request on a fresh socket, read to the server's close: (head, body)."""
    host, port = url.removeprefix("http://").split(":")
    reply = b""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(request)
            while chunk := await stream.receive_some():
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head, body


# ---- GET /v1/models/{model}, through the openai SDK ------------------------------------------


def sdk_calls(url: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10)
    found: dict[str, Any] = {"model": client.models.retrieve(MODEL)}
    try:
        client.models.retrieve("no-such-model")
    except openai.NotFoundError as exc:
        found["unknown"] = exc
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nobody", max_retries=0, timeout=10)
    try:
        stranger.models.retrieve(MODEL)
    except openai.AuthenticationError as exc:
        found["stranger"] = exc
    return found


async def test_the_sdk_retrieves_a_model_and_gets_404_for_an_unknown_one(url: str) -> None:
    with trio.fail_after(30):
        found = await trio.to_thread.run_sync(sdk_calls, url, abandon_on_cancel=True)
    model = found["model"]
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "scheduler")
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            listed = await client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
    # the same entry as in the list
    assert model.model_dump(exclude_unset=True) == listed.json()["data"][0]
    unknown = found["unknown"]
    assert unknown.status_code == 404
    assert unknown.body["code"] == "model_not_found" and unknown.body["param"] == "model"
    assert found["stranger"].status_code == 401


async def test_a_model_name_with_a_slash_is_one_model(url: str) -> None:
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            response = await client.get(
                "/v1/models/org/demo-small", headers={"authorization": f"Bearer {KEY}"}
            )
    assert response.status_code == 404
    assert "org/demo-small" in openai_error(response)["message"]


# ---- numbers that parse as infinity, and nesting ---------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("temperature", b"1e999999", "temperature"),
        ("top_p", b"-1e400", "top_p"),
        ("frequency_penalty", b"1E+309", "frequency_penalty"),
        ("logit_bias", b'{"42": 1e999}', "logit_bias.42"),
        ("stop", b'["a", [2e308]]', "stop[1][0]"),
    ],
)
async def test_a_number_too_big_for_a_float_is_a_400_naming_it(
    url: str, field: str, value: bytes, param: str
) -> None:
    body = json.dumps({**CHAT, field: None}).encode().replace(b"null", value)
    response = await post(url, body)
    assert response.status_code == 400, response.text
    error = openai_error(response)
    assert error["param"] == param and "finite" in error["message"]


def nested(depth: int) -> bytes:
    return b"[" * depth + b'"x"' + b"]" * depth


@pytest.mark.parametrize("depth", [900, 976])
async def test_stop_nested_hundreds_deep_is_a_400(url: str, depth: int) -> None:
    """Such a `stop` used to be parsed and forwarded (200), then overflow the recursion limit
    wherever the body was walked again: the cache key's json.dumps on a shed request (500)."""
    body = json.dumps({**CHAT, "stop": None}).encode().replace(b"null", nested(depth))
    response = await post(url, body)
    assert response.status_code == 400, response.text
    error = openai_error(response)
    # 976 may already be too deep for the parser itself, depending on the stack in use
    assert error["param"] == "stop" or "too deeply" in error["message"]
    if depth == 900:
        assert error["param"] == "stop" and str(MAX_JSON_DEPTH) in error["message"]


async def test_nesting_just_inside_the_bound_is_served(url: str) -> None:
    # the body is level 1 and `metadata` level 2: its innermost list is at MAX_JSON_DEPTH
    body = json.dumps({**CHAT, "metadata": None}).encode()
    inside = body.replace(b"null", nested(MAX_JSON_DEPTH - 1))
    response = await post(url, inside)
    assert response.status_code == 200, response.text
    outside = await post(url, body.replace(b"null", nested(MAX_JSON_DEPTH)))
    assert outside.status_code == 400
    assert openai_error(outside)["param"] == "metadata"


# ---- paths that are no route ------------------------------------------------------------------


# (leading slashes are werkzeug's to drop, without a redirect: `//v1/models` is /v1/models)
@pytest.mark.parametrize("path", [b"/admin/v1//keys", b"/v1//models", b"/v1/models//"])
async def test_a_doubled_slash_is_a_json_404_not_a_redirect(url: str, path: bytes) -> None:
    request = b"GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
    request += b"Connection: close\r\n\r\n"
    head, body = await raw_exchange(url, request % (path, KEY.encode()))
    assert head.startswith(b"HTTP/1.1 404"), head
    assert b"location:" not in head.lower()
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", [b"/v1/\xc3\xa9", b"/v1/models/\xff", b"/\x80"])
async def test_raw_non_ascii_bytes_in_the_path_get_a_json_400(url: str, path: bytes) -> None:
    """h11 refuses these before the app; the answer is still OpenAI-shaped."""
    head, body = await raw_exchange(url, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-type: application/json" in head.lower()
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


async def test_the_connection_still_serves_after_an_escaped_non_ascii_path(url: str) -> None:
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            first = await client.get("/v1/%C3%A9")
            second = await client.get("/healthz")
    assert first.status_code == 404 and openai_error(first)["message"]
    assert second.status_code == 200


# ---- the OpenAPI document describes this process ----------------------------------------------


async def document_of(url: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


async def test_the_document_has_no_admin_routes_when_the_admin_api_is_off(url: str) -> None:
    paths = (await document_of(url))["paths"]
    assert not [p for p in paths if p.startswith("/admin/")]
    assert "get" in paths["/v1/models/{model}"]
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            off = await client.get("/admin/v1/keys")
    assert off.status_code == 404  # what the document now says: no such route


async def test_the_document_lists_the_admin_routes_when_it_is_on(
    nursery: trio.Nursery, redis_url: str
) -> None:
    url = await serve(nursery, redis_url, admin=True)
    paths = (await document_of(url))["paths"]
    assert {"/admin/v1/keys", "/admin/v1/controller", "/admin/v1/drain"} <= set(paths)
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        with trio.fail_after(10):
            response = await client.get("/admin/v1/keys")
    assert response.status_code == 401  # as the document says: the admin token is missing
