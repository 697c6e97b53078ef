"""Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Validation errors (pydantic, malformed JSON) become 400 invalid_request_error naming the
offending field; starlette's own 404/405 keep their status; anything unexpected is a 500
server_error whose details go to the log, not to the client.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .logs import log_event

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) for the first problem pydantic found."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None, "json_invalid"
    param = ".".join(loc) or None
    where = f"'{param}': " if param else "body: "
    if first.get("type") == "extra_forbidden":
        return where + "unsupported parameter (cadre refuses what it would otherwise ignore)", param, \
            "unsupported_parameter"
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return where + message, param, first.get("type", "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param, code = describe_validation_error(exc)
        return error_response(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log_event("unhandled_error", level=logging.ERROR, path=request.url.path, error=repr(exc))
        return error_response(APIError(500, "internal server error", type="server_error"))


class BearerAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <key>`, except on exempt paths."""

    def __init__(self, app, api_key: str, exempt: tuple[str, ...]):
        self.app, self.key, self.exempt = app, api_key.encode(), frozenset(exempt)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt or self._authorized(scope):
            return await self.app(scope, receive, send)
        response = error_response(APIError(401, "missing or invalid API key (expected 'Authorization: Bearer KEY')",
                                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        await response(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, declared (Content-Length) or streamed.

    The body is read here, up to the limit, and replayed to the app: a limit enforced while
    the app parses would surface as the framework's generic parse error instead of a 413.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._reject(scope, receive, send)
        body_sent = False

        async def replay():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices, for streaming responses

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        message = f"request body exceeds the limit of {self.limit} bytes (--max-body-bytes)"
        response = error_response(APIError(413, message, code="request_too_large"))
        await response(scope, receive, send)
