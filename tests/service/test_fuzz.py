"""Fuzzing the whole HTTP surface on real sockets: schemathesis against the served
/openapi.json, Hypothesis against raw bodies and headers, and the inputs they found pinned down.

Why a worker thread: schemathesis and the Hypothesis fuzzers drive synchronous clients, while
the gateway, the demo backend and the control loop are trio tasks in the test's nursery. The
client side runs in `trio.to_thread.run_sync` under a deadline, so one process holds both sides
and a crash shows up with the server's traceback in the captured log.

Every reply is held to one set of rules (`reply_problems`): a status the document lists for the
operation, no 5xx but a 503 with Retry-After, strict JSON (no NaN or Infinity), OpenAI's error
shape wherever the document promises it, nothing a client sent in the response headers.
Generation is derandomized and never shrinks, so a run is bounded and replays exactly; a
fuzzer collects every distinct problem before it fails. Tests marked xfail name the bug (or the
error in the document) that they pin down; strict, so a fix turns them red until unmarked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar

import httpx2
import hypothesis
import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckContext, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi import checks as openapi_checks

from backends.demo.server import DemoConfig, serve_demo_backend
from backends.redis.embedded import EmbeddedRedis
from scheduler.models.gpu import GpuConfig
from scheduler.openai.body import MAX_TOKENS_CAP
from scheduler.service.config import gains_to_dict, load_settings
from scheduler.service.gateway import FORWARDED_HEADERS
from scheduler.service.openapi import openapi_document
from scheduler.service.serve import with_demo_url
from tests.conftest import start_gateway
from tests.support.error_shape import OPENAI_FIELDS, REFUSAL_FIELDS

T = TypeVar("T")
TOKEN = "fuzz-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
BEARER = {"authorization": "Bearer sk-demo-enterprise"}
MODEL = "demo-small"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SETTINGS = load_settings(None, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
DOCUMENT = openapi_document(SETTINGS)
GAINS = gains_to_dict(SETTINGS.controller)
MAX_BODY = SETTINGS.server.max_body_bytes
PROMPT = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
}
INFERENCE = tuple(PROMPT)
QUOTA = "/admin/v1/keys/{key_id}/quota"
UPGRADES = "/admin/v1/keys/{key_id}/upgrades"
CREDITS = "/admin/v1/keys/{key_id}/credits"
DRAIN = "POST /admin/v1/drain"
SELF = "GET /openapi.json"  # schemathesis leaves the document's own URL out of its operations
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method in item
    if method in {"get", "put", "post", "delete", "patch"}
]
MARKER = "x-fuzz-injected"  # the header every injection attempt tries to add
RATE_LIMIT_COUNT = re.compile(r"x-ratelimit-(limit|remaining)-", re.IGNORECASE)
# a GPU so fast that any answer the demo's context allows comes within a second
FUZZ_GPU = GpuConfig(max_batch=16, kv_capacity_tokens=4096, decode_base_s=5e-5, decode_per_seq_s=0)

# ---- what the fuzzers found: bugs, and errors in the document --------------------------------

DOC_GAINS = (
    "document: the gains' ranges and relations (0 < decrease_factor < 1, "
    "min_limit <= initial_limit <= max_limit, ...) are checked by AIMDConfig, not described"
)


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


# ---- the rules every reply is held to ---------------------------------------------------------


def documented(method: str, template: str, status: int) -> dict[str, Any] | None:
    """The document's response for `status`; an undocumented method is documented as a 405
    (and OPTIONS as a 200 with Allow, which the framework answers on every route)."""
    operation = DOCUMENT["paths"][template].get(method.lower())
    if operation is None:
        allowed = {200, 405} if method == "OPTIONS" else {405}
        return {"description": "no such operation"} if status in allowed else None
    response: dict[str, Any] | None = operation["responses"].get(str(status))
    return response


def strict_json(body: bytes) -> Any:
    def refuse(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(body, parse_constant=refuse)


def error_problems(body: bytes, *, refusal: bool) -> list[str]:
    """OpenAI's four fields, and on a 429 or 503 the refusal's five (README "Rejections")."""
    try:
        error = strict_json(body)["error"]
    except (ValueError, TypeError, KeyError) as exc:
        return [f"error body is not OpenAI-shaped JSON ({exc!r}): {body[:200]!r}"]
    fields = OPENAI_FIELDS | REFUSAL_FIELDS if refusal else OPENAI_FIELDS
    if not isinstance(error, dict) or set(error) != fields:
        return [f"error object has the wrong fields: {body[:200]!r}"]
    if refusal and not (
        isinstance(error["reason"], str)
        and isinstance(error["limit"], str)
        and isinstance(error["retryable"], bool)
        and all(
            error[k] is None or isinstance(error[k], int | float) for k in ("threshold", "observed")
        )
    ):
        return [f"refusal fields have the wrong types: {body[:200]!r}"]
    kinds = [
        isinstance(error["message"], str) and bool(error["message"]),
        isinstance(error["type"], str),
        error["param"] is None or isinstance(error["param"], str),
        error["code"] is None or isinstance(error["code"], str),
    ]
    return [] if all(kinds) else [f"error fields have the wrong types: {body[:200]!r}"]


def header_problems(headers: Iterable[tuple[str, str]], *, retry_after: bool) -> list[str]:
    problems = []
    seconds = ""
    for name, value in headers:
        if MARKER in name.lower() or MARKER in value.lower() or "\r" in value or "\n" in value:
            problems.append(f"injected header {name}: {value!r}")
        if name.lower() == "retry-after":
            seconds = value
        if RATE_LIMIT_COUNT.match(name) and not value.isdigit():
            problems.append(f"{name}: {value!r} is not a count")
    if retry_after and not (seconds.isdigit() and int(seconds) >= 1):
        problems.append(f"no Retry-After of whole seconds ({seconds!r})")
    return problems


def reply_problems(
    method: str, template: str, status: int, headers: Iterable[tuple[str, str]], body: bytes
) -> list[str]:
    """Everything wrong with one reply to `method template`; empty when it is as documented."""
    headers = list(headers)
    doc = documented(method, template, status)
    is_error = status >= 400 and (doc is None or "#/components/schemas/" in str(doc))
    needs_retry = status in (429, 503) and (doc is None or "Retry-After" in doc.get("headers", {}))
    problems = header_problems(headers, retry_after=needs_retry)
    if doc is None:
        problems.append(f"status {status} is not documented for {method} {template}")
    if status >= 500 and status != 503:
        problems.append(f"server error {status}: {body[:200]!r}")
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    html = body.lstrip()[:1] == b"<" or (bool(body) and content_type.startswith("text/html"))
    if html or b"Traceback (most recent call last)" in body:
        problems.append(f"a traceback or HTML reached the client: {body[:200]!r}")
    if is_error:
        if not content_type.startswith("application/json"):
            problems.append(f"error with content-type {content_type!r}")
        problems += error_problems(body, refusal=status in (429, 503))
    elif content_type.startswith("application/json") and method != "HEAD":
        try:
            strict_json(body)
        except ValueError as exc:
            problems.append(f"{status} body is not strict JSON ({exc}): {body[:200]!r}")
    return problems


def assert_documented(method: str, template: str, response: httpx2.Response) -> None:
    headers = response.headers.multi_items()
    problems = reply_problems(method, template, response.status_code, headers, response.content)
    assert not problems, f"{method} {template} -> {response.status_code}: {problems}"


def report(found: Mapping[str, str]) -> str:
    return f"{len(found)} distinct: {sorted(found)}\n\n" + "\n\n".join(list(found.values())[:8])


class Findings:
    """Distinct problems with one example each, so that one run reports all of them."""

    def __init__(self) -> None:
        self.found: dict[str, str] = {}

    def check(self, method: str, template: str, sent: bytes, response: httpx2.Response) -> None:
        headers = response.headers.multi_items()
        status = response.status_code
        for problem in reply_problems(method, template, status, headers, response.content):
            key = f"{method} {template} {status} {problem[:40]}"
            self.found.setdefault(key, f"{method} {template} {sent[:300]!r}: {problem}")


# ---- the gateway under test, and the client side in a thread ---------------------------------


@pytest.fixture(scope="module")
def fuzz_redis_url() -> Iterator[str]:
    """A Redis of this module's own: the fuzzers leave keys that no other test should meet."""
    with EmbeddedRedis() as redis:
        yield redis.url


@dataclasses.dataclass(frozen=True)
class Served:
    url: str
    key_id: str  # a scratch key, for the /admin/v1/keys/{key_id} routes


@pytest.fixture
async def served(nursery: trio.Nursery, fuzz_redis_url: str) -> Served:
    port = await nursery.start(serve_demo_backend, DemoConfig(FUZZ_GPU, default_output_tokens=4))
    settings = with_demo_url(SETTINGS, f"http://127.0.0.1:{port}")
    url = await start_gateway(nursery, dataclasses.replace(settings, redis_url=fuzz_redis_url))
    async with httpx2.AsyncClient(base_url=url, timeout=10, headers=ADMIN) as client:
        with trio.fail_after(10):
            # gains live in the module's Redis: undo whatever an earlier test's fuzzing set
            assert (await client.put("/admin/v1/controller", json=GAINS)).status_code == 200
            r = await client.post("/admin/v1/keys", json={"tenant": "fuzz", "tier": "pro"})
    assert r.status_code == 201, r.text
    return Served(url, r.json()["key_id"])


async def in_thread(work: Callable[[], T], timeout_s: float = 60) -> T:
    with trio.fail_after(timeout_s):
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)


def for_each(strategy: st.SearchStrategy[T], test: Callable[[T], None], n: int) -> None:
    """`test` on `n` derandomized examples, no shrinking; nothing to generate is no failure."""

    @hypothesis.settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(strategy)
    def run(value: T) -> None:
        test(value)

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # e.g. no input to negate
        run()


async def send_one(
    served: Served,
    method: str,
    path: str,
    body: bytes | AsyncIterator[bytes] | None = None,
    headers: Mapping[str, str | bytes] | None = None,
) -> httpx2.Response:
    auth = ADMIN if path.startswith("/admin/") else BEARER
    given = {**auth, "content-type": "application/json", **(headers or {})}
    sent = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in given.items()]
    async with httpx2.AsyncClient(base_url=served.url, timeout=15) as client:
        with trio.fail_after(15):
            return await client.request(method, path, content=body, headers=sent)


async def still_serving(served: Served) -> None:
    response = await send_one(served, "POST", "/v1/chat/completions", chat_with())
    assert response.status_code == 200, response.text


def chat_with(**fields: Any) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


# ---- schemathesis against /openapi.json ------------------------------------------------------


def openai_replies(ctx: CheckContext, response: schemathesis.Response, case: Case[Any]) -> None:
    """The house rules (`reply_problems`) as a schemathesis check."""
    headers = [(k, v) for k, values in response.headers.items() for v in values]
    status, body = response.status_code, response.content
    problems = reply_problems(case.method, case.operation.path, status, headers, body)
    if problems:
        raise AssertionError("; ".join(problems))


CONFORMANCE: list[CheckFunction] = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.unsupported_method,
    openai_replies,
]
DESCRIBES_VALIDATION: list[CheckFunction] = [
    openapi_checks.positive_data_acceptance,
    openapi_checks.negative_data_rejection,
]
# sent before the generated cases, so that what the xfails name is found whatever the seed
PINNED: dict[str, list[dict[str, Any]]] = {
    "POST /v1/chat/completions": [{**CHAT, "stream": True}],
    "POST /v1/completions": [{"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}],
    f"POST {CREDITS}": [{"amount": 5, "ttl_s": 1e300}],
}


def tame(case: Case[Any]) -> Case[Any]:
    """A served model and a short answer, so that positive cases reach the backend."""
    if isinstance(case.body, dict):
        case.body["model"] = MODEL
        max_tokens = case.body.get("max_tokens")
        if isinstance(max_tokens, int):
            case.body["max_tokens"] = min(max_tokens, 8)
    return case


def case_strategies(
    operation: APIOperation[Any, Any, Any, Any], key_id: str, *, to_backend: bool
) -> list[st.SearchStrategy[Case[Any]]]:
    found = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        found.append(operation.as_strategy(generation_mode=mode))
        if "{key_id}" in operation.path:  # an existing key, so that the body is read at all
            known = {"key_id": key_id}
            found.append(operation.as_strategy(generation_mode=mode, path_parameters=known))
        if to_backend and operation.path in INFERENCE and mode is GenerationMode.POSITIVE:
            found.append(operation.as_strategy(generation_mode=mode).map(tame))
    return found


def fuzz_operation(
    served: Served, label: str, checks: list[CheckFunction], max_examples: int = 25
) -> dict[str, str]:
    """Coverage cases, then fuzzed ones, for one operation: its distinct failures."""
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", timeout=10)
    operation = next(
        op.ok()
        for op in schema.get_all_operations()
        if isinstance(op, Ok) and op.ok().label == label
    )
    headers = ADMIN if operation.path.startswith("/admin/") else BEARER
    found: dict[str, str] = {}

    def send(case: Case[Any]) -> None:
        response = case.call(base_url=served.url, headers=headers, timeout=15)
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                found.setdefault(f"{failure.title} ({response.status_code})", str(group))

    conformance = checks is CONFORMANCE  # else the document's validation, without the demo's
    known = {"key_id": served.key_id} if "{key_id}" in operation.path else None
    for body in PINNED.get(label, []) if conformance else []:
        send(operation.Case(body=body, path_parameters=known))
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    config = schema.config.generation_for(operation=operation, phase="coverage")
    for case in schema.iter_coverage_cases(
        operation, generation_modes=modes, generation_config=config
    ):
        send(case)
    for strategy in case_strategies(operation, served.key_id, to_backend=conformance):
        for_each(strategy, send, max_examples)
    return found


def labels(xfails: Mapping[str, str]) -> list[Any]:
    return [
        pytest.param(label, marks=xfail(xfails[label])) if label in xfails else label
        for label in OPERATIONS
        if label not in (DRAIN, SELF)
    ]


@pytest.mark.parametrize(
    "label",
    labels({}),
)
async def test_schemathesis_replies_are_documented(served: Served, label: str) -> None:
    found = await in_thread(partial(fuzz_operation, served, label, CONFORMANCE))
    assert not found, report(found)
    await still_serving(served)


async def test_schemathesis_drain_last_then_503s_are_documented(served: Served) -> None:
    found = await in_thread(partial(fuzz_operation, served, DRAIN, CONFORMANCE, 5))
    assert not found, report(found)
    with trio.fail_after(5):
        while (response := await send_one(served, "GET", "/readyz")).status_code != 503:
            await trio.sleep(0.05)
    assert_documented("GET", "/readyz", response)
    # a prompt nobody sent before: a cached answer would still be served, by design
    uncached = chat_with(messages=[{"role": "user", "content": "after the drain"}])
    response = await send_one(served, "POST", "/v1/chat/completions", uncached)
    assert response.status_code == 503
    assert_documented("POST", "/v1/chat/completions", response)


@pytest.mark.parametrize(
    "label",
    labels(
        {
            "PUT /admin/v1/controller": DOC_GAINS,
        }
    ),
)
async def test_schemathesis_document_describes_the_validation(served: Served, label: str) -> None:
    """What the document calls valid is accepted, and what it calls invalid is refused."""
    found = await in_thread(partial(fuzz_operation, served, label, DESCRIBES_VALIDATION))
    assert not found, report(found)


async def test_openapi_json_is_strict_json(served: Served) -> None:
    response = await send_one(served, "GET", "/openapi.json")
    assert response.status_code == 200
    assert_documented("GET", "/openapi.json", response)


async def test_openapi_servers_url_reaches_this_gateway(served: Served) -> None:
    document = (await send_one(served, "GET", "/openapi.json")).json()
    assert document["servers"][0]["url"] in ("/", served.url)


# ---- Hypothesis: inference bodies of any shape, and mangled bytes ----------------------------

WEIRD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "a\udfffb",
        "\u202e",
        "\U0001f642" * 500,
        "x" * 100_000,
        f"{MODEL}\r\n{MARKER}: 1",
        f"%0d%0a{MARKER}:%201",
        "<html><body>",
    ]
)
TEXT = st.text(max_size=30) | WEIRD_TEXT
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats()
    | TEXT
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
# token counts the demo answers at once: small, or over the gateway's cap
TOKEN_COUNTS = (
    st.integers(max_value=8)
    | st.integers(min_value=MAX_TOKENS_CAP + 1)
    | JSON_VALUES.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
)
FIELDS = ("model", "stream", "max_tokens", "max_completion_tokens", "n", "temperature", "user")
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": TEXT | JSON_VALUES}, optional={"content": JSON_VALUES}),
    max_size=3,
)
NASTY_BYTES = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b'"\\ud800"',
    b"\x00",
    b"\xff\xfe",
    b"\xc3",
    b"\xed\xa0\x80",
    b"{",
    b"]",
    b'"',
    b"\\",
]


def good_body(route: str) -> dict[str, Any]:
    if route == "/v1/chat/completions":
        return dict(CHAT)
    return {"model": MODEL, PROMPT[route]: "hi", "max_tokens": 2}


def field_values(name: str) -> st.SearchStrategy[Any]:
    if name in ("max_tokens", "max_completion_tokens", "n"):
        return TOKEN_COUNTS
    if name == "model":
        return st.just(MODEL) | TEXT | JSON_VALUES
    if name == "stream":
        return st.booleans() | JSON_VALUES
    if name == "messages":
        return MESSAGES | JSON_VALUES
    if name in ("prompt", "input"):
        return TEXT | st.lists(TEXT | st.integers(), max_size=4) | JSON_VALUES
    return JSON_VALUES


@st.composite
def inference_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A body with fields of any type, some missing, some unknown, one maybe given twice."""
    route = draw(st.sampled_from(INFERENCE))
    body = good_body(route)
    names = [*FIELDS, PROMPT[route]]
    for name in sorted(draw(st.sets(st.sampled_from(names), max_size=3))):  # sorted: replays
        body[name] = draw(field_values(name))
    for name in draw(st.sets(st.sampled_from(names), max_size=1)):
        body.pop(name, None)
    extra = draw(st.dictionaries(TEXT.filter(lambda k: k not in names), JSON_VALUES, max_size=2))
    raw = json.dumps({**body, **extra}).encode()
    if draw(st.booleans()):  # a duplicate key: Python's json keeps the last, like most parsers
        name = draw(st.sampled_from(["model", "stream", PROMPT[route]]))
        twice = json.dumps({name: draw(field_values(name))}).encode()
        raw = raw[:-1] + b", " + twice[1:] if raw != b"{}" else twice
    return route, raw


@st.composite
def mangled_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A good body with bytes inserted, overwritten or cut: bad UTF-8, NaN, broken syntax."""
    route = draw(st.sampled_from(INFERENCE))
    raw = bytearray(json.dumps(good_body(route)).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        piece = draw(st.sampled_from(NASTY_BYTES) | st.binary(min_size=1, max_size=4))
        edit = draw(st.sampled_from(["insert", "overwrite", "cut"]))
        if edit == "insert":
            raw[at:at] = piece
        elif edit == "overwrite":
            raw[at : at + len(piece)] = piece
        else:
            del raw[at:]
    return route, bytes(raw)


def fuzz_bodies(served: Served, requests: st.SearchStrategy[tuple[str, bytes]]) -> Findings:
    findings = Findings()
    headers = {**BEARER, "content-type": "application/json"}
    with httpx2.Client(base_url=served.url, timeout=15) as client:

        def send(request: tuple[str, bytes]) -> None:
            route, body = request
            findings.check("POST", route, body, client.post(route, content=body, headers=headers))

        for_each(requests, send, 200)
    return findings


@pytest.mark.parametrize(
    "requests", [inference_requests(), mangled_requests()], ids=["any-shape", "mangled-bytes"]
)
async def test_inference_bodies_get_documented_replies(
    served: Served, requests: st.SearchStrategy[tuple[str, bytes]]
) -> None:
    findings = await in_thread(partial(fuzz_bodies, served, requests))
    assert not findings.found, report(findings.found)
    await still_serving(served)


# ---- Hypothesis: admin bodies ----------------------------------------------------------------

NUMBERS = (
    st.integers()
    | st.integers(min_value=2**62, max_value=2**70)
    | st.floats()
    | st.sampled_from([10**400, 1e300, 5e-324])
)
QUOTA_BODY = {
    "algorithm": st.sampled_from(["gcra", "sliding_log", "sliding_counter"]) | JSON_VALUES,
    **{
        name: NUMBERS | JSON_VALUES
        for name in ("period_s", "requests", "tokens", "request_burst", "token_burst")
    },
}
ADMIN_BODIES: dict[tuple[str, str], dict[str, st.SearchStrategy[Any]]] = {
    ("POST", "/admin/v1/keys"): {
        "tenant": TEXT | JSON_VALUES,
        "tier": st.sampled_from([t.core.name for t in SETTINGS.tiers]) | TEXT | JSON_VALUES,
        "bypass": st.booleans() | JSON_VALUES,
    },
    ("PUT", QUOTA): QUOTA_BODY,
    ("POST", UPGRADES): {**QUOTA_BODY, "expires_in_s": NUMBERS | JSON_VALUES},
    ("POST", CREDITS): {"amount": NUMBERS | JSON_VALUES, "ttl_s": NUMBERS | JSON_VALUES},
    ("PUT", "/admin/v1/controller"): {  # no tick_s: a tiny tick would spin the control loop
        name: NUMBERS | JSON_VALUES | st.sampled_from(["latency", "ttft", "tpot"])
        for name in GAINS
        if name != "tick_s"
    },
}


@st.composite
def admin_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    method, template = draw(st.sampled_from(sorted(ADMIN_BODIES)))
    body = draw(st.fixed_dictionaries({}, optional=ADMIN_BODIES[method, template]))
    body.update(draw(st.dictionaries(TEXT, JSON_VALUES, max_size=1)))
    return method, template, json.dumps(body).encode()


PINNED_ADMIN = [
    ("POST", CREDITS, b'{"amount": 5, "ttl_s": NaN}'),
    ("PUT", QUOTA, b'{"period_s": Infinity}'),
    ("PUT", "/admin/v1/controller", b'{"latency_signal": []}'),
]


def fuzz_admin(served: Served) -> Findings:
    findings = Findings()
    headers = {**ADMIN, "content-type": "application/json"}
    with httpx2.Client(base_url=served.url, timeout=15) as client:

        def send(request: tuple[str, str, bytes]) -> None:
            method, template, body = request
            path = template.replace("{key_id}", served.key_id)
            response = client.request(method, path, content=body, headers=headers)
            findings.check(method, template, body, response)

        for pinned in PINNED_ADMIN:  # what the xfail names, found whatever the seed
            send(pinned)
        for_each(admin_requests(), send, 150)
        restored = client.put("/admin/v1/controller", json=GAINS, headers=ADMIN)
        assert restored.status_code == 200, restored.text
    return findings


async def test_admin_bodies_of_any_shape_get_documented_replies(served: Served) -> None:
    findings = await in_thread(partial(fuzz_admin, served))
    assert not findings.found, report(findings.found)
    await still_serving(served)


# ---- pinned inputs: each a bug the fuzzers found, or a rule they only meet by luck -----------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


DEEP_OBJECTS = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
PROMPT_OF = json.dumps({"model": MODEL, "prompt": [[0]], "max_tokens": 2}).encode()
HUGE_DIGITS = b"9" * 5000


@pytest.mark.parametrize(
    ("method", "template", "body"),
    [
        pytest.param("POST", INFERENCE[0], nested(100_000), id="chat-100k"),
        pytest.param("POST", INFERENCE[2], DEEP_OBJECTS, id="embed-10k-obj"),
        pytest.param(
            "POST",
            INFERENCE[0],
            chat_with(user=None).replace(b"null", nested(5_000)),
            id="chat-user-5k",
        ),
        pytest.param(
            "POST",
            INFERENCE[1],
            PROMPT_OF.replace(b"[[0]]", nested(600)),
            id="prompt-600",
        ),
        pytest.param(
            "PUT",
            "/admin/v1/controller",
            nested(10_000),
            id="gains-10k",
        ),
        pytest.param("POST", "/admin/v1/keys", DEEP_OBJECTS, id="keys-10k-obj"),
        pytest.param(
            "POST",
            INFERENCE[0],
            chat_with(seed=0).replace(b'"seed": 0', b'"seed": ' + HUGE_DIGITS),
            id="chat-5000-digits",
        ),
        pytest.param(
            "PUT",
            "/admin/v1/controller",
            b'{"cooldown_s": ' + HUGE_DIGITS + b"}",
            id="gains-5000-digits",
        ),
        pytest.param(
            "PUT",
            "/admin/v1/controller",
            b'{"cooldown_s": 1' + b"0" * 400 + b"}",
            id="gains-10**400",
        ),
        pytest.param("POST", INFERENCE[1], PROMPT_OF.replace(b"[[0]]", nested(50)), id="prompt-50"),
        pytest.param(
            "POST",
            INFERENCE[0],
            chat_with(max_tokens=0).replace(b": 0", b": " + HUGE_DIGITS[:4000]),
            id="max-tokens-4000-digits",
        ),
    ],
)
async def test_deep_or_huge_json_is_refused_not_crashed(
    served: Served, method: str, template: str, body: bytes
) -> None:
    response = await send_one(served, method, template, body)
    assert_documented(method, template, response)
    assert response.status_code == 400
    await still_serving(served)


@pytest.mark.parametrize(
    ("method", "template", "bodies"),
    [
        *(
            pytest.param("POST", CREDITS, bodies, id=name)
            for name, bodies in {
                "credits-ttl-nan": [b'{"amount": 5, "ttl_s": NaN}'],
                "credits-ttl-inf": [b'{"amount": 5, "ttl_s": Infinity}'],
                "credits-ttl-1e300": [b'{"amount": 5, "ttl_s": 1e300}'],
                "credits-2**63": [b'{"amount": 9223372036854775808}'],
                "credits-sum-past-int64": [b'{"amount": 4611686018427387904}'] * 2,
            }.items()
        ),
        pytest.param(
            "PUT",
            "/admin/v1/controller",
            [b'{"latency_signal": []}'],
            id="gains-signal-list",
        ),
        pytest.param(
            "PUT",
            "/admin/v1/controller",
            [b'{"max_limit": Infinity}'],
            id="gains-infinity",
        ),
        pytest.param(
            "PUT",
            QUOTA,
            [b'{"period_s": Infinity, "requests": 5}'],
            id="quota-infinity",
        ),
        pytest.param(
            "POST",
            UPGRADES,
            [b'{"period_s": Infinity, "requests": 5, "expires_in_s": 60}'],
            id="upgrade-infinity",
        ),
        pytest.param(
            "POST",
            "/admin/v1/keys",
            [b'{"tenant": "\\ud800", "tier": "pro"}'],
            id="tenant-surrogate",
        ),
        pytest.param(
            "PUT",
            QUOTA,
            [b'{"requests": 5, "bogus": 1}'],
            id="quota-unknown-field",
        ),
        pytest.param("POST", UPGRADES, [b'{"requests": 5, "expires_in_s": NaN}'], id="upgrade-nan"),
    ],
)
async def test_admin_refuses_what_it_cannot_keep(
    served: Served, method: str, template: str, bodies: list[bytes]
) -> None:
    path = template.replace("{key_id}", served.key_id)
    statuses = []
    for body in bodies:
        response = await send_one(served, method, path, body)
        assert_documented(method, template, response)
        statuses.append(response.status_code)
    assert statuses[-1] == 400, statuses
    await still_serving(served)


@pytest.mark.parametrize(
    ("template", "body"),
    [
        pytest.param(QUOTA, {"requests": 10**30}, id="quota-10**30"),
        pytest.param(
            UPGRADES,
            {"tokens": 10**30, "expires_in_s": 60},
            id="upgrade-10**30",
        ),
        pytest.param(QUOTA, {"requests": 1000, "period_s": 1e-9}, id="quota-1ns"),
    ],
)
async def test_a_key_with_extreme_quotas_gets_documented_replies(
    served: Served, template: str, body: dict[str, Any]
) -> None:
    new = json.dumps({"tenant": "extreme", "tier": "pro"}).encode()
    created = (await send_one(served, "POST", "/admin/v1/keys", new)).json()
    method = "PUT" if template == QUOTA else "POST"
    path = template.replace("{key_id}", created["key_id"])
    response = await send_one(served, method, path, json.dumps(body).encode())
    assert_documented(method, template, response)
    await trio.sleep(0.6)  # the key registry's cache time
    key = {"authorization": f"Bearer {created['key']}"}
    for _ in range(2):
        response = await send_one(served, "POST", INFERENCE[0], chat_with(), key)
        assert_documented("POST", INFERENCE[0], response)


def padded_chat(size: int) -> bytes:
    """A good chat body of exactly `size` bytes; the padding is in `user`."""
    return chat_with(user="x" * (size - len(chat_with(user=""))))


async def chunks_of(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for at in range(0, len(body), size):
        yield body[at : at + size]


async def test_a_body_at_the_limit_is_served(served: Served) -> None:
    body = padded_chat(MAX_BODY)
    assert len(body) == MAX_BODY
    response = await send_one(served, "POST", INFERENCE[0], body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("template", [*INFERENCE, pytest.param("/admin/v1/keys")])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_gets_413(served: Served, template: str, chunked: bool) -> None:
    body = padded_chat(MAX_BODY + 1)
    response = await send_one(served, "POST", template, chunks_of(body) if chunked else body)
    assert response.status_code == 413
    assert response.headers.get("connection") == "close"
    assert_documented("POST", template, response)
    await still_serving(served)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", INFERENCE[0], chat_with(model=f"{MODEL}\r\n{MARKER}: 1")),
        ("POST", INFERENCE[1], chat_with(model=f"%0d%0a{MARKER}:%201")),
        ("POST", INFERENCE[2], chat_with(model="\u00e9\U0001f642" * 100_000)),  # 1.8 MB
        ("POST", "/admin/v1/keys", b'{"tenant": "\\r\\nx-fuzz-injected: 1", "tier": "pro"}'),
        ("GET", f"/admin/v1/keys/a%0d%0a{MARKER}:%201", None),
    ],
)
async def test_nothing_a_client_sends_reaches_the_response_headers(
    served: Served, method: str, path: str, body: bytes | None
) -> None:
    response = await send_one(served, method, path, body)
    template = path if path in DOCUMENT["paths"] else "/admin/v1/keys/{key_id}"
    assert_documented(method, template, response)


async def test_a_bare_cr_in_a_header_is_refused_before_the_app(served: Served) -> None:
    """h11 refuses the request itself (a bare 400, not the app's JSON): nothing is injected."""
    host, port = served.url.removeprefix("http://").split(":")
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r%b: 1\r\n\r\n"
    reply = b""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(request % MARKER.encode())
            while chunk := await stream.receive_some():
                reply += chunk
    head = reply.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400")
    assert MARKER.encode() not in head


@pytest.mark.parametrize(
    "name",
    [*(pytest.param(h) for h in FORWARDED_HEADERS), "x-other"],
)
async def test_non_ascii_header_values_get_documented_replies(served: Served, name: str) -> None:
    response = await send_one(served, "POST", INFERENCE[0], chat_with(), {name: b"\xff\xfe!"})
    assert_documented("POST", INFERENCE[0], response)
    await still_serving(served)
