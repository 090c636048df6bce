"""The OpenAPI document of the whole HTTP surface, served at /openapi.json."""

from __future__ import annotations

import dataclasses
from typing import Any

from scheduler.core import AIMDConfig
from scheduler.service.config import MAX_COUNT, MAX_PERIOD_S, MAX_TTL_S, Settings
from scheduler.service.controls import MAX_WAIT_HEADER, PRIORITY_HEADER

GAINS = [f.name for f in dataclasses.fields(AIMDConfig)]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
# every 429 and 503: OpenAI's four fields and why (README "Rejections", scheduler.openai.errors)
_REFUSAL = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": [
                *_ERROR["properties"]["error"]["required"],  # type: ignore[index]
                "reason",
                "limit",
                "threshold",
                "observed",
                "retryable",
            ],
            "properties": {
                **_ERROR["properties"]["error"]["properties"],  # type: ignore[index]
                "reason": {"type": "string", "description": "Why; on a 503 also x-scheduler-shed."},
                "limit": {"type": "string", "description": "The knob that decided."},
                "threshold": {**_NUMBER_OR_NULL, "description": "Where the knob stands."},
                "observed": {**_NUMBER_OR_NULL, "description": "What was measured against it."},
                "retryable": {"type": "boolean", "description": "Can the same request succeed?"},
            },
        }
    },
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    },
    "retry-after-ms": {
        "description": "The same wait in milliseconds (the openai SDKs read it first).",
        "schema": {"type": "integer"},
    },
    "x-should-retry": {
        "description": 'Present as "false" when no retry can succeed (the refusal\'s '
        "retryable is false): the openai SDKs then do not retry.",
        "schema": {"type": "string", "enum": ["false"]},
    },
}
_RATE_LIMIT = {
    name: {"description": description, "schema": {"type": "string"}}
    for name, description in {
        "x-ratelimit-limit-requests": "The key's request quota per period.",
        "x-ratelimit-remaining-requests": "Requests left in the period.",
        "x-ratelimit-reset-requests": "Time until the request quota is whole again (e.g. 6m0s).",
        "x-ratelimit-limit-tokens": "The key's token quota per period.",
        "x-ratelimit-remaining-tokens": "Tokens left in the period.",
        "x-ratelimit-reset-tokens": "Time until the token quota is whole again.",
        "x-ratelimit-congested-factor": (
            "Present while the backends are congested and the tier's quota is scaled down "
            "(tiers.T.quota.congested_factor): the limits above are that fraction."
        ),
        "RateLimit-Policy": 'IETF quota policies, e.g. "requests";q=60;w=60.',
        "RateLimit": 'IETF quota state, e.g. "requests";r=59;t=1.',
    }.items()
}


def _error(description: str, *, retry: bool = False, limits: bool = False) -> dict[str, Any]:
    schema = "#/components/schemas/" + ("Refusal" if retry else "Error")
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": schema}}},
    }
    headers = {**(_RETRY_AFTER if retry else {}), **(_RATE_LIMIT if limits else {})}
    if headers:
        response["headers"] = headers
    return response


def _ok(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }


def _admin(
    method: str,
    summary: str,
    ok: str,
    body: dict[str, Any] | None = None,
    *,
    status: str = "200",
    required: bool = True,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{"admin": []}],
        "responses": {
            status: _ok(ok),
            "400": _error("Invalid body; the message names the field."),
            "401": _error("Missing or wrong admin token."),
            "413": _error("Body larger than the configured limit."),
            "404": _error("Unknown key."),
            "503": _error("Redis is unavailable (down, paused or refusing).", retry=True),
        },
    }
    if body is not None:
        operation["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": body}},
        }
    return {method: operation}


_QUOTA_FIELDS = {
    "algorithm": {"type": "string", "enum": ["gcra", "sliding_log", "sliding_counter"]},
    "period_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_PERIOD_S},
    "requests": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
    "tokens": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
    "request_burst": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
    "token_burst": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
    "max_concurrency": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
}


def _admin_schemas(tiers: list[str]) -> dict[str, dict[str, Any]]:
    """The admin API's request bodies, by name."""
    quota = {"type": "object", "properties": _QUOTA_FIELDS, "additionalProperties": False}
    upgrade = {
        "type": "object",
        "required": ["expires_in_s"],
        "properties": {
            **_QUOTA_FIELDS,
            "expires_in_s": {"type": "number", "minimum": 0.001, "maximum": MAX_TTL_S},
        },
        "minProperties": 2,
        "additionalProperties": False,
    }
    new_key = {
        "type": "object",
        "required": ["tenant", "tier"],
        "properties": {
            "tenant": {"type": "string", "minLength": 1},
            "tier": {"type": "string", "enum": tiers},
            "bypass": {"type": "boolean"},
        },
        "additionalProperties": False,  # the admin API refuses unknown fields
    }
    credits = {
        "type": "object",
        "required": ["amount"],
        "properties": {
            "amount": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
            "ttl_s": {"type": "number", "minimum": 0.001, "maximum": MAX_TTL_S},
        },
        "additionalProperties": False,
    }
    bypass = {
        "type": "object",
        "required": ["bypass"],
        "properties": {"bypass": {"type": "boolean"}},
        "additionalProperties": False,
    }
    return {
        "quota": quota,
        "upgrade": upgrade,
        "new_key": new_key,
        "credits": credits,
        "bypass": bypass,
    }


def _gains_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            name: (
                {"type": "string", "enum": ["latency", "ttft", "tpot"]}
                if name == "latency_signal"
                else {"type": "number"}
            )
            for name in GAINS
        },
        "additionalProperties": False,
    }


def _key_paths(tiers: list[str]) -> dict[str, Any]:
    """/admin/v1/keys and each key's routes."""
    body = _admin_schemas(tiers)
    key_id = [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}]

    def with_id(item: dict[str, Any]) -> dict[str, Any]:
        return {"parameters": key_id, **item}

    return {
        "/admin/v1/keys": {
            **_admin("get", "List keys (ids, never the keys)", "The keys."),
            **_admin(
                "post",
                "Create a key; the clear key is returned once",
                "The new key.",
                body["new_key"],
                status="201",
            ),
        },
        "/admin/v1/keys/{key_id}": with_id(
            {
                **_admin("get", "One key's record", "The record."),
                **_admin("delete", "Revoke a key", "Revoked."),
                **_admin(
                    "patch",
                    "Turn the key into a bypass key, or back (every replica)",
                    "The record.",
                    body["bypass"],
                ),
            }
        ),
        "/admin/v1/keys/{key_id}/quota": with_id(
            _admin(
                "put",
                "Replace the key's quota override ({} clears)",
                "The override.",
                body["quota"],
            )
        ),
        "/admin/v1/keys/{key_id}/upgrades": with_id(
            _admin(
                "post", "A temporary quota upgrade", "The upgrade.", body["upgrade"], status="201"
            )
        ),
        "/admin/v1/keys/{key_id}/credits": with_id(
            _admin("post", "Grant burst credits (tokens)", "The balance.", body["credits"])
        ),
    }


def _lever_paths(tiers: list[str], request_timeout_s: float) -> dict[str, Any]:
    """The SRE's emergency levers (`scheduler.service.levers`)."""
    timeout = {
        "type": "object",
        "required": ["request_timeout_s"],
        "properties": {
            "request_timeout_s": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "maximum": request_timeout_s,
                "description": "Lower the backend request timeout; null: the config's again.",
            }
        },
        "additionalProperties": False,
    }
    tenant = [{"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "/admin/v1/levers": {
            **_admin("get", "The emergency levers", "The levers."),
            **_admin("put", "Lower the backend timeout live, or back", "The levers.", timeout),
        },
        "/admin/v1/tenants/{tenant}": {
            "parameters": tenant,
            **_admin(
                "patch",
                "Turn every key of a tenant into bypass, or back (every replica)",
                "The levers.",
                _admin_schemas(tiers)["bypass"],
            ),
        },
    }


def _admin_paths(tiers: list[str], request_timeout_s: float) -> dict[str, Any]:
    return {
        **_key_paths(tiers),
        **_lever_paths(tiers, request_timeout_s),
        "/admin/v1/controller": {
            **_admin("get", "The controller's gains and state", "Gains and state."),
            **_admin(
                "put",
                "Change gains live, on every replica",
                "The new gains.",
                _gains_schema(),
                required=False,
            ),
        },
        "/admin/v1/drain": _admin("post", "Drain the process (every worker)", "Draining."),
        "/admin/v1/undrain": _admin("post", "Take new requests again", "Whether draining."),
    }


def _controls(tiers: list[str]) -> list[dict[str, Any]]:
    """The per-request controls (`scheduler.service.controls`): lower only, clamped."""
    return [
        {
            "name": PRIORITY_HEADER,
            "in": "header",
            "required": False,
            "description": (
                "Queue as this tier if its weight is below the key's tier's; a tier that is "
                "not lower is clamped to the key's own (never an error). Unknown tier: 400."
            ),
            "schema": {"type": "string", "enum": tiers},
        },
        {
            "name": MAX_WAIT_HEADER,
            "in": "header",
            "required": False,
            "description": (
                "Wait at most this many seconds in the queue; above the tier's max_wait_s it "
                "is clamped to it (never an error). Not a number > 0: 400."
            ),
            "schema": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)$"},
        },
    ]


def _inference(
    summary: str, schema: dict[str, Any], *, streams: bool, tiers: list[str]
) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"type": "string"}},
            }
        }
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": _controls(tiers),
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {
                    "description": "The backend's answer, passed through (or a cached one).",
                    "content": ok,
                    "headers": _RATE_LIMIT,
                },
                "400": _error("Invalid JSON or parameters."),
                "401": _error("Missing, unknown or revoked API key."),
                "403": _error("The key's tier is not configured on this gateway."),
                "404": _error("Unknown model."),
                "429": _error(
                    "Over the key's quota, or its max_concurrency.", retry=True, limits=True
                ),
                "413": _error("Body larger than the configured limit."),
                "501": _error("The backend does not serve this route (told in its words)."),
                "502": _error("The backend failed."),
                "503": _error("Overloaded, shed, or no backend available.", retry=True),
                "504": _error("The backend did not answer in time."),
            },
        }
    }


def _request_schema(
    required: str, prompt: dict[str, Any], *, max_tokens: str = "max_tokens"
) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "model": {"type": "string", "minLength": 1},
        required: prompt,
        "stream": {"type": "boolean"},
        max_tokens: {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    }
    if max_tokens == "max_tokens":  # the Responses API has no `n`
        properties["n"] = {"type": "integer", "minimum": 1, "maximum": 128}
    return {"type": "object", "required": ["model", required], "properties": properties}


_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}


_STATUS = {"type": "object"}


def _json_ok(description: str, schema: dict[str, Any] = _STATUS) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _inference_paths(tiers: list[str]) -> dict[str, Any]:
    """The OpenAI-compatible POST routes."""
    messages = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"type": "string"},
                "content": {"type": ["string", "array", "null"]},
            },
        },
    }
    token = {"type": "integer"}
    piece = {"oneOf": [{"type": "string"}, token, {"type": "array", "items": token}]}
    text = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": piece}]}
    responses_input = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1}]}
    return {
        "/v1/chat/completions": _inference(
            "Chat completion (OpenAI-compatible)",
            _request_schema("messages", messages),
            streams=True,
            tiers=tiers,
        ),
        "/v1/completions": _inference(
            "Text completion (OpenAI-compatible)",
            _request_schema("prompt", text),
            streams=True,
            tiers=tiers,
        ),
        "/v1/responses": _inference(
            "Response (OpenAI's Responses API; passed on, never cached)",
            _request_schema("input", responses_input, max_tokens="max_output_tokens"),
            streams=True,
            tiers=tiers,
        ),
        "/v1/embeddings": _inference(
            "Embeddings (OpenAI-compatible)",
            _request_schema("input", text),
            streams=False,
            tiers=tiers,
        ),
    }


def _models_path() -> dict[str, Any]:
    return {
        "get": {
            "summary": "The models this gateway serves",
            "security": [{"bearer": []}],
            "responses": {
                "200": _json_ok("A list of models."),
                "401": _error("Missing or unknown API key."),
                "503": _error("The key could not be checked right now.", retry=True),
            },
        }
    }


def _model_path() -> dict[str, Any]:
    return {
        "get": {
            "summary": "One model this gateway serves (the SDK's models.retrieve)",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "model",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            ],
            "responses": {
                "200": _json_ok("The model.", _MODEL),
                "401": _error("Missing or unknown API key."),
                "404": _error("This gateway serves no such model."),
                "503": _error("The key could not be checked right now.", retry=True),
            },
        }
    }


def _plain_get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": responses}}


def _operations_paths() -> dict[str, Any]:
    """/healthz, /readyz and /metrics (in the document's order, /v1/models/{model} between)."""
    metrics = {
        "description": "Prometheus text format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return {
        "/healthz": _plain_get("The process is alive", {"200": _json_ok("Alive.")}),
        "/readyz": _plain_get(
            "Redis reachable, a backend healthy, not draining",
            {
                "200": _json_ok("Ready."),
                "503": _json_ok("Not ready; the body says which check failed."),
            },
        ),
        "/metrics": _plain_get(
            "Prometheus metrics (every worker's, in one scrape)", {"200": metrics}
        ),
    }


_COMPONENTS = {
    "schemas": {"Error": _ERROR, "Refusal": _REFUSAL},
    "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"},
        "admin": {
            "type": "http",
            "scheme": "bearer",
            "description": "SCHEDULER_ADMIN_TOKEN",
        },
    },
}


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of what a process with `settings` serves."""
    # the admin routes only where they are served: with no admin token they answer 404
    tiers = [t.core.name for t in settings.tiers]
    timeout_s = settings.server.request_timeout_s
    admin = _admin_paths(tiers, timeout_s) if settings.admin_token else {}
    return {
        "openapi": "3.1.0",
        "info": {"title": "inference-scheduler gateway", "version": "0.1.0"},
        "servers": [{"url": "/"}],
        "components": _COMPONENTS,
        "paths": {
            **_inference_paths(tiers),
            "/v1/models": _models_path(),
            **_operations_paths(),
            "/v1/models/{model}": _model_path(),
            **admin,
            "/openapi.json": _plain_get("This document", {"200": _json_ok("OpenAPI 3.1.")}),
        },
    }
