"""Streams to and from whole completions (`scheduler.openai.sse`): cached completions as
SSE streams read by the official `openai` SDK, and streamed answers (made here, and by the demo
backend) joined back into the completion they add up to."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from backends.demo.server import DemoConfig, serve_demo_backend
from scheduler.openai.sse import (
    check_completion,
    completion_to_sse,
    split_words,
    sse_to_completion,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# --- a whole completion as a stream ---------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog, and then it naps in the warm sun."
CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "llama-3-8b",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": TEXT},
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 18, "total_tokens": 23},
}
TOOL_COMPLETION: dict[str, Any] = CHAT_COMPLETION | {
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ]
}
TEXT_COMPLETION: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1_700_000_000,
    "model": "llama-3-8b",
    "choices": [
        {"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "text": " Short.", "logprobs": None, "finish_reason": "length"},
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25},
}


def sdk_client(events: list[bytes]) -> openai.OpenAI:
    """The official SDK, reading `events` as the body of every response."""

    def respond(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "text/event-stream"}
        return httpx2.Response(200, headers=headers, content=b"".join(events))

    transport = httpx2.MockTransport(respond)
    http_client = httpx2.Client(transport=transport)
    return openai.OpenAI(
        api_key="k", base_url="http://gateway/v1", http_client=http_client, max_retries=0
    )


def stream_chat(events: list[bytes]) -> list[ChatCompletionChunk]:
    client = sdk_client(events)
    stream = client.chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    return list(stream)


def test_every_event_is_one_complete_data_event() -> None:
    events = completion_to_sse(CHAT, json.dumps(CHAT_COMPLETION).encode())
    assert events[-1] == b"data: [DONE]\n\n"
    for event in events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert event.count(b"\n") == 2
        chunk = ChatCompletionChunk.model_validate(json.loads(event[6:]))
        assert chunk.object == "chat.completion.chunk"


def test_a_chat_completion_streams_through_the_sdk_and_reassembles() -> None:
    events = completion_to_sse(CHAT, json.dumps(CHAT_COMPLETION).encode())
    chunks = stream_chat(events)
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert 3 <= len(middle) <= 8
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
    assert last.choices[0].finish_reason == "length"
    assert {(c.id, c.model, c.created, c.system_fingerprint) for c in chunks} == {
        ("chatcmpl-1", "llama-3-8b", 1_700_000_000, "fp_1")
    }
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.current_completion_snapshot  # get_final_completion refuses "length"
    assert final.choices[0].message.content == TEXT
    assert final.choices[0].finish_reason == "length"


def test_tool_calls_stream_through_the_sdk_and_reassemble() -> None:
    events = completion_to_sse(CHAT, json.dumps(TOOL_COMPLETION).encode())
    state = ChatCompletionStreamState()
    for chunk in stream_chat(events):
        state.handle_chunk(chunk)
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    (call,) = choice.message.tool_calls or []
    assert call.id == "call_1"
    assert call.type == "function"
    assert call.function.name == "weather"
    assert call.function.arguments == '{"city": "Paris"}'


def test_usage_comes_last_when_asked_for() -> None:
    body = json.dumps(CHAT_COMPLETION).encode()
    assert all(c.usage is None for c in stream_chat(completion_to_sse(CHAT, body)))
    *_, usage_chunk = stream_chat(completion_to_sse(CHAT, body, include_usage=True))
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.total_tokens == 23


def test_a_text_completion_streams_through_the_sdk_per_choice() -> None:
    events = completion_to_sse(COMPLETIONS, json.dumps(TEXT_COMPLETION).encode())
    client = sdk_client(events)
    chunks = list(client.completions.create(model="llama-3-8b", prompt="hi", stream=True))
    assert {c.object for c in chunks} == {"text_completion"}
    for original in TEXT_COMPLETION["choices"]:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == original["index"]]
        assert "".join(c.text for c in mine) == original["text"]
        assert [c.finish_reason for c in mine][-1] == original["finish_reason"]
        assert all(c.finish_reason is None for c in mine[:-1])


def test_only_completions_stream() -> None:
    with pytest.raises(ValueError, match="stream"):
        completion_to_sse("/v1/embeddings", b'{"data": []}')
    with pytest.raises(ValueError, match="choices"):
        completion_to_sse(CHAT, b'{"error": {"message": "no"}}')


@given(text=st.text(st.sampled_from("ab \n\t")), max_pieces=st.integers(1, 10))
def test_split_words_joins_back_in_few_non_empty_pieces(text: str, max_pieces: int) -> None:
    pieces = split_words(text, max_pieces)
    assert "".join(pieces) == text
    assert len(pieces) <= max_pieces
    assert all(pieces)
    assert all(not p[:1].isspace() or i == 0 for i, p in enumerate(pieces))


# --- a stream as the whole completion -------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "completion"),
    [(CHAT, CHAT_COMPLETION), (CHAT, TOOL_COMPLETION), (COMPLETIONS, TEXT_COMPLETION)],
    ids=["chat", "tool-calls", "text"],
)
def test_a_stream_joins_back_into_its_completion(route: str, completion: dict[str, Any]) -> None:
    events = completion_to_sse(route, json.dumps(completion).encode(), include_usage=True)
    joined = json.loads(sse_to_completion(route, b"".join(events)))
    expected = json.loads(json.dumps(completion))
    for choice in expected["choices"]:
        choice["logprobs"] = None
    assert joined == expected
    model = ChatCompletion if route == CHAT else Completion
    model.model_validate(joined)  # what the SDK reads, when a stream's answer is served whole


@given(
    text=st.text(st.sampled_from("ab \n\t"), max_size=40),
    arguments=st.text(st.sampled_from('{}":ab '), max_size=30),
    max_pieces=st.integers(1, 10),
)
def test_any_content_and_tool_arguments_survive_the_round_trip(
    text: str, arguments: str, max_pieces: int
) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = {"role": "assistant", "content": text or None, "tool_calls": [call]}
    completion = CHAT_COMPLETION | {
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]
    }
    raw = json.dumps(completion).encode()
    events = completion_to_sse(CHAT, raw, include_usage=True, max_pieces=max_pieces)
    assert json.loads(sse_to_completion(CHAT, b"".join(events))) == completion


def test_tool_call_arguments_in_pieces_are_joined_per_call() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n"

    first = {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}
    second = {"index": 1, "id": "b", "type": "function", "function": {"name": "g"}}
    stream = b"".join(
        [
            b": keep-alive comment\n\n",
            chunk({"role": "assistant", "tool_calls": [first, second]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            chunk({}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
    )
    message = json.loads(sse_to_completion(CHAT, stream))["choices"][0]["message"]
    assert message["content"] is None
    assert [(c["id"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("a", '{"a": 1}'),
        ("b", "{}"),
    ]


@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n',  # cut short
        b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n',
        b'data: {"error": {"message": "backend failed"}}\n\ndata: [DONE]\n\n',
        b"data: not json\n\ndata: [DONE]\n\n",
        b"data: [DONE]\n\n",
        b'data: {"choices": [{"delta": {"tool_calls": ["x"]}, "finish_reason": "stop"}]}\n\n'
        b"data: [DONE]\n\n",
        b'data: {"choices": [{"delta": {"tool_calls": [{"function": "f"}]}, "finish_reason": "s"}]}'
        b"\n\ndata: [DONE]\n\n",
        b'data: {"choices": [{"index": [1], "delta": {}, "finish_reason": "stop"}]}\n\n'
        b"data: [DONE]\n\n",
    ],
    ids=[
        "no-done",
        "no-finish-reason",
        "error-event",
        "not-json",
        "empty",
        "tool-call-not-an-object",
        "function-not-an-object",
        "index-not-a-number",
    ],
)
def test_a_stream_that_did_not_end_well_is_not_a_completion(stream: bytes) -> None:
    with pytest.raises(ValueError):
        sse_to_completion(CHAT, stream)


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
async def test_the_demo_backends_streams_join_into_what_it_answers_whole(
    nursery: trio.Nursery, route: str
) -> None:
    port = await nursery.start(serve_demo_backend, DemoConfig())
    body: dict[str, Any] = {"model": "demo-small", "max_tokens": 12, "seed": 7}
    if route == CHAT:
        body["messages"] = [{"role": "user", "content": "Tell me about foxes."}]
    else:
        body["prompt"] = "Tell me about foxes."
    with trio.fail_after(10):
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            whole = (await client.post(route, json=body)).json()
            options = {"stream": True, "stream_options": {"include_usage": True}}
            streamed = await client.post(route, json=body | options)
    joined = json.loads(sse_to_completion(route, streamed.content))
    for answer in (whole, joined):
        for volatile in ("id", "created"):
            answer.pop(volatile, None)
    assert joined == whole


@pytest.mark.parametrize(
    ("route", "body", "whole"),
    [
        ("/v1/chat/completions", b'{"choices": [{"message": {"content": "hi"}}]}', True),
        ("/v1/completions", b'{"choices": [{"text": "hi"}]}', True),
        ("/v1/embeddings", b'{"data": [{"embedding": [0.1]}]}', True),
        ("/v1/chat/completions", b"<html><body>502 Bad Gateway</body></html>", False),
        ("/v1/chat/completions", b'{"error": {"message": "overloaded"}}', False),
        ("/v1/chat/completions", b'{"choices": []}', False),
        ("/v1/chat/completions", b'{"choices": [{"text": "hi"}]}', False),
        ("/v1/completions", b'{"choices": [{"text": null}]}', False),
        ("/v1/embeddings", b'{"data": []}', False),
        ("/v1/chat/completions", b"[" * 100_000, False),
    ],
)
def test_only_whole_answers_pass_the_check(route: str, body: bytes, whole: bool) -> None:
    if whole:
        check_completion(route, body)
    else:
        with pytest.raises(ValueError):
            check_completion(route, body)
