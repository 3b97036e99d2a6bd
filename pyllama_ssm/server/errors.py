"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}.

Every refusal names the field at fault in `param` and in the message, so the
official openai client raises BadRequestError & co. with a useful text.  Routes
of another API register the shape their clients read (`shape_errors`: the
Anthropic routes answer {"type": "error", "error": {"type", "message"}}), and
every refusal on them, from the middleware to a failure mid-stream, takes it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MemoryFullError, PyllamaError

logger = logging.getLogger("pyllama_ssm.server")

RETRY_AFTER_S = 1  # what 429/503 answers tell clients to wait


class ApiError(Exception):
    """A refusal with its HTTP status, raised anywhere below a route."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", retry_after: Optional[int] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, path: Optional[str] = None) -> JSONResponse:
        """The error as an answer, in the shape the route at `path` answers (OpenAI's by default)."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(_SHAPES.get(path or "", ApiError.body)(self), status_code=self.status, headers=headers)


# paths whose errors another API's clients read: path -> the error's body in that shape
_SHAPES: dict[str, Callable[[ApiError], dict[str, Any]]] = {}


def shape_errors(paths: Iterable[str], body: Callable[[ApiError], dict[str, Any]]) -> None:
    """Answer every error of these routes (paths below the root path) with body(error)."""
    for path in paths:
        _SHAPES[path] = body


def route_path(scope: Any) -> str:
    """The request's path below the app's root path."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# what every route may answer besides its 200 (documented in the OpenAPI schema)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "Invalid request: `param` names the field at fault",
        401: "Missing or wrong API key (when the server has one)",
        404: "Unknown model alias or route",
        413: "Request body over max_request_bytes",
        429: "The model's queue is full: retry after Retry-After seconds",
        500: "Internal error",
        503: "Shutting down, or the model cannot serve: retry after Retry-After seconds",
    }.items()}


def bad_request(param: str, message: str, code: Optional[str] = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def unavailable(message: str, status: int = 503) -> ApiError:
    kind = "rate_limit_error" if status == 429 else "server_error"
    return ApiError(status, message, type=kind, code="unavailable" if status == 503 else "queue_full",
                    retry_after=RETRY_AFTER_S)


# "Requested tokens (N) exceed context window of M" (llama-cpp-python's wording)
_CONTEXT_EXCEEDED = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
_LEADING_NAME = re.compile(r"^([a-z_][a-z0-9_]*)\s*(?:[:=]|\b)")


def from_exception(error: BaseException, fields: set[str]) -> ApiError:
    """What a model call raised, as an API error: bad input is a 400 naming the field, the rest a 500.

    `fields` are the request's field names; a message that starts with one
    ("max_tokens=-1: must be >= 0", "grammar: ...") names it.
    """
    message = str(error) or type(error).__name__
    if _CONTEXT_EXCEEDED.search(message) or isinstance(error, MemoryFullError):
        param = next(name for name in ("messages", "input", "prompt") if name in fields or name == "prompt")
        return ApiError(400, f"{param}: {message}", param=param, code="context_length_exceeded")
    if isinstance(error, (ValueError, TypeError, PyllamaError)) and not isinstance(error, RuntimeError):
        match = _LEADING_NAME.match(message)
        param = match.group(1) if match and match.group(1) in fields else None
        return ApiError(400, message, param=param)
    logger.error("request failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {message}", type="server_error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first invalid field of a body, e.g. 'max_tokens: Input should be greater than or equal to 0'."""
    problems = exc.errors()
    first = problems[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"body: invalid JSON ({first.get('ctx', {}).get('error', first['msg'])})", param="body")
    path = _field_path(first["loc"])
    if not path:
        if first["type"] in ("model_attributes_type", "model_type", "dict_type", "missing"):
            return ApiError(400, "body: a JSON object is required (Content-Type: application/json)", param="body")
        message = _reason(first)  # a check across fields: its message starts with the field's name
        match = _LEADING_NAME.match(message)
        return ApiError(400, message, param=match.group(1) if match else "body")
    # a value that fits no branch of a union fails once per branch: say all of them
    reasons = list(dict.fromkeys(_reason(p) for p in problems if _field_path(p["loc"]) == path))
    return ApiError(400, f"{'.'.join(path)}: {' or '.join(reasons)}", param=path[0])


def _field_path(loc: tuple) -> list[str]:
    """loc without 'body' and without the union branch names pydantic adds ('str', 'list[int]')."""
    branch = r"[a-z-]+\[.*\]|str|int|float|bool|constrained-[a-z]+"
    return [str(p) for p in loc if p != "body" and not re.fullmatch(branch, str(p))]


def _reason(problem: dict) -> str:
    return problem["msg"].removeprefix("Value error, ")


def install(app: FastAPI) -> None:
    """Answer every error of the app in the OpenAI shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(route_path(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response(route_path(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = ApiError(exc.status_code, str(exc.detail), type=kind).response(route_path(request.scope))
        response.headers.update(exc.headers or {})  # 405's Allow
        return response
