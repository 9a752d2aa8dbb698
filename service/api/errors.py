"""One error shape for every failure, OpenAI style: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError`; the handlers here turn it, FastAPI's validation errors, a body that is not JSON text and
Starlette's 404/405 into that shape, so clients (the `openai` package included) can always read `error.message` and
`error.param`. `openapi.document_errors` makes the OpenAPI document say the same: every status each operation can
answer, with this shape, and not FastAPI's 422 (a validation error here is a 400).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "internal_error",
               503: "service_unavailable", 504: "timeout_error"}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's union-member loc entries
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LEADING_FIELD = re.compile(r"^([a-z_]+)\b:?\s*")
_FIELD_PART = re.compile(r"[.\[]")
# pydantic's messages that say less than they could
_MESSAGES = {"string_unicode": "must be valid Unicode text (it holds a lone surrogate)"}


class APIError(Exception):
    """An error the client should see as it is: status, message and (when one field is to blame) its name."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its engine requests are already aborted."""


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unavailable(message: str, code: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def from_value_error(error: ValueError, names: Mapping[str, str] | None = None, prefix: str = "") -> APIError:
    """The engine's ValueErrors start with the offending field's name; report it under the API's name for it
    (`names` maps engine names to this endpoint's, e.g. max_new_tokens -> max_tokens)."""
    message = str(error)
    match = _LEADING_FIELD.match(message)
    param = None
    if match:
        engine_name = match.group(1)
        param = (names or {}).get(engine_name, engine_name)
        if param != engine_name:
            message = message.replace(engine_name, param)
    if prefix:
        message = f"{prefix}{message}"
    return APIError(400, message, param=param, code="invalid_value")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """('body', 'prompt', 'list[str]', 2) -> 'prompt[2]': drops 'body' and pydantic's union-member tags."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and _IDENTIFIER.match(item) and item not in _TYPE_TAGS:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def _field(param: str | None) -> str | None:
    """'stop[3]' -> 'stop', 'stream_options.include_usage' -> 'stream_options'."""
    return _FIELD_PART.split(param, 1)[0] if param else None


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of pydantic errors -> one 400 naming the first bad field (union alternatives merged)."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    param = _param_of(tuple(first.get("loc", ())))
    if param is None:
        if first.get("type") == "missing":
            return APIError(400, "a JSON body is required", code="missing_body")
        if first.get("type") in ("model_attributes_type", "dict_type"):
            return APIError(400, "the body must be a JSON object (Content-Type: application/json)",
                            code="invalid_body")
    # A union's alternatives each report an error. Those of the input's own type (a list of 1000 stop strings:
    # "at most 16 items") say more than the type mismatches of the others ("should be a valid string").
    field = _field(param)
    related = [e for e in errors if _field(_param_of(tuple(e.get("loc", ())))) == field]
    specific = [e for e in related if not str(e.get("type", "")).endswith("_type")]
    if specific and len(specific) < len(related):
        errors, first = specific, specific[0]
        param = _param_of(tuple(first.get("loc", ())))
    messages: list[str] = []
    for error in errors:
        message = _MESSAGES.get(error.get("type"), error.get("msg"))
        if _param_of(tuple(error.get("loc", ()))) == param and message not in messages:
            messages.append(message)
    return APIError(400, f"{param}: {' or '.join(messages)}", param=param, code=first.get("type"))


def unparsable_body(exc: StarletteHTTPException) -> APIError | None:
    """FastAPI answers a bare 400 "There was an error parsing the body" (no code) when json.loads fails other than
    with a JSONDecodeError: bytes that are not UTF-8 text, nesting deeper than the parser recurses, an integer of
    more digits than Python converts. Each is a body that is not JSON as the server reads it: invalid_json."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        why = f"it is not UTF-8 text ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        why = "it nests deeper than the parser goes"
    elif isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        why = f"a number has more than {sys.get_int_max_str_digits()} digits"
    elif isinstance(cause, ValueError):
        why = str(cause)
    else:
        return None
    return APIError(400, f"the body is not valid JSON: {why}", code="invalid_json")


def install_error_handlers(app: FastAPI) -> None:
    """The handlers that give every failure the error shape (service/api/openapi.py documents them)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unparsable = unparsable_body(exc)
        if unparsable is not None:
            return unparsable.response()
        status = exc.status_code
        message = {404: f"no route {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        return APIError(status, message, code=code, headers=exc.headers).response()

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return JSONResponse(error_body("client closed the request", "client_closed_request"), status_code=499)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # reached only if a middleware itself fails
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)
