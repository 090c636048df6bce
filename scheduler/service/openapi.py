"""The OpenAPI document of the whole HTTP surface, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from scheduler.service.config import Settings

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
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        response["headers"] = _RETRY_AFTER
    return response


def _inference(summary: str, schema: dict[str, Any], *, streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {"description": "The backend's answer, passed through.", "content": ok},
                "400": _error("Invalid JSON or parameters."),
                "401": _error("Missing or unknown API key."),
                "404": _error("Unknown model."),
                "413": _error("Body larger than the configured limit."),
                "502": _error("The backend failed."),
                "503": _error("Overloaded, shed, or no backend available.", retry=True),
                "504": _error("The backend did not answer in time."),
            },
        }
    }


def _request_schema(required: str, prompt: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["model", required],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            required: prompt,
            "stream": {"type": "boolean"},
            "max_tokens": {"type": "integer", "minimum": 1},
            "n": {"type": "integer", "minimum": 1, "maximum": 128},
        },
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
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
    text = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1}]}
    status = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "inference-scheduler gateway", "version": "0.1.0"},
        "servers": [{"url": f"http://{settings.server.host}:{settings.server.port}"}],
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/chat/completions": _inference(
                "Chat completion (OpenAI-compatible)",
                _request_schema("messages", messages),
                streams=True,
            ),
            "/v1/completions": _inference(
                "Text completion (OpenAI-compatible)", _request_schema("prompt", text), streams=True
            ),
            "/v1/embeddings": _inference(
                "Embeddings (OpenAI-compatible)", _request_schema("input", text), streams=False
            ),
            "/v1/models": {
                "get": {
                    "summary": "The models this gateway serves",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {
                            "description": "A list of models.",
                            "content": {"application/json": {"schema": status}},
                        },
                        "401": _error("Missing or unknown API key."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is alive",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": {"application/json": {"schema": status}},
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Redis reachable, a backend healthy, not draining",
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": {"application/json": {"schema": status}},
                        },
                        "503": {
                            "description": "Not ready; the body says which check failed.",
                            "content": {"application/json": {"schema": status}},
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "content": {"application/json": {"schema": status}},
                        }
                    },
                }
            },
        },
    }
