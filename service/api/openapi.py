"""The app's OpenAPI document, made to say what the server does (FastAPI's own lists a 422 this server never sends,
and knows nothing of the middleware's answers)."""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi import FastAPI

from service.api.middleware import OPEN_PATHS
from service.api.schemas import ERRORS, SSE_EVENT, ErrorResponse

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")  # an OpenAPI path item's keys


def document_errors(app: FastAPI) -> None:
    """Makes the app's OpenAPI document say what the server does: every operation lists each error status it can
    answer with the error body, FastAPI's 422 (which this server never sends) is dropped, and a streamed 200 has
    its text/event-stream schema. The routes list what they answer themselves (400, 404, 503, see schemas.py);
    here come those of the middleware: 401 on every operation but the open ones when an API key is set, 408 and
    413 on those that take a body, 500 (a bug, or the engine failed the request) on all. An event stream documented
    with an example only gets a generic event schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            settings = getattr(getattr(app.state, "lmserve", None), "settings", None)
            _document(generate(), api_key=getattr(settings, "api_key", None) is not None)
        return app.openapi_schema  # type: ignore[return-value]
    app.openapi = openapi  # type: ignore[method-assign]


def _document(schema: dict[str, Any], api_key: bool) -> None:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    if "ErrorResponse" not in schemas:  # no route listed an error: add the body's schema
        body = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}), ErrorResponse=body)

    def error(status: int) -> dict[str, Any]:
        return {**ERRORS[status], "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/ErrorResponse"}}}}

    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = [500] if method in ("get", "head", "options") else [408, 413, 500]  # see BodyLimit
            if api_key and path not in OPEN_PATHS:
                statuses.append(401)
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
            else:
                responses.pop("401", None)
            for status in statuses:
                responses.setdefault(str(status), error(status))
            for response in responses.values():
                stream = response.get("content", {}).get("text/event-stream")
                if stream is not None:  # its events' schemas go to components (see schemas.sse_content)
                    stream["schema"] = event = copy.deepcopy(stream.get("schema", SSE_EVENT))  # not the route's
                    for name, definition in event.pop("$defs", {}).items():
                        schemas.setdefault(name, definition)
            operation["responses"] = dict(sorted(responses.items()))
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, referenced by nothing now
        if name in schemas and f'"#/components/schemas/{name}"' not in json.dumps(schema):
            del schemas[name]
    if api_key:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
