"""The prompt estimate of `scheduler/openai/body.py`: every text a prompt carries is counted."""

from __future__ import annotations

import json

from scheduler.openai.body import read_call

ARGUMENTS = json.dumps({"rows": ["x" * 40] * 100})  # ~4,500 characters: ~1,100 tokens


def prompt_tokens(route: str, body: dict[str, object]) -> int:
    raw = json.dumps({"model": "m", **body}).encode()
    return read_call(route, raw, default_max_tokens=16).prompt_tokens


def test_tool_calls_carried_back_count_in_a_chat_prompt() -> None:
    asked = {"role": "user", "content": "list them"}
    called = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ARGUMENTS}}
        ],
    }
    answered = {"role": "tool", "tool_call_id": "c1", "content": ARGUMENTS}
    bare = prompt_tokens("chat", {"messages": [asked, answered]})
    whole = prompt_tokens("chat", {"messages": [asked, called, answered]})
    assert whole - bare > len(ARGUMENTS) // 4


def test_a_responses_input_counts_its_function_calls_and_outputs() -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "list them"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": ARGUMENTS},
        {"type": "function_call_output", "call_id": "c1", "output": ARGUMENTS},
    ]
    assert prompt_tokens("responses", {"input": items}) > 2 * (len(ARGUMENTS) // 4)
    assert prompt_tokens("responses", {"input": "hi", "instructions": "x" * 400}) > 100


def test_a_batch_of_prompts_reserves_an_answer_for_each() -> None:
    def reserved(prompt: object, n: int = 1) -> int:
        raw = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 10, "n": n}).encode()
        return read_call("completions", raw, default_max_tokens=16).max_tokens

    # llama-server and vLLM answer each prompt of a batch (choices 0..k-1): k x max_tokens
    assert reserved("one") == 10
    assert reserved([1, 2, 3]) == 10  # one prompt of token ids
    assert reserved(["a", "b", "c"]) == 30
    assert reserved([[1, 2], [3]], n=2) == 40


def test_the_tools_offered_count_in_the_prompt() -> None:
    # engines write the tools' names, descriptions and schemas into the prompt
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    asked: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
    offered = prompt_tokens("chat", {**asked, "tools": tools}) - prompt_tokens("chat", asked)
    assert offered > len(json.dumps(tools)) // 4 - 1
    flat = [{"type": "function", "name": "f", "parameters": schema}]  # the Responses API's
    assert prompt_tokens("responses", {"input": "hi", "tools": flat}) > len(json.dumps(flat)) // 4
