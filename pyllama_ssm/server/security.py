"""ASGI middleware that runs before any route: the API key and the request size limit.

Both answer before the body is parsed, so an unauthenticated or oversized
request costs neither JSON parsing nor a model call.  The key comes as
`Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's,
as llama-server takes it too).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, route_path

# answered without the API key: load balancer probes, and the chat page (static; it asks for the key)
OPEN_PATHS = frozenset({"/health", "/"})


class ApiKeyMiddleware:
    """With an API key set, every route but OPEN_PATHS needs 'Authorization: Bearer <key>' or 'x-api-key: <key>'."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: the time taken does not tell how much of the key matched
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            return True
        return b"x-api-key" in headers and hmac.compare_digest(headers[b"x-api-key"].strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or route_path(scope) in OPEN_PATHS \
                or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "Invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                         code="invalid_api_key")
        response = error.response(route_path(scope))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with 413, by Content-Length or by counting."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self, size: int | str) -> ApiError:
        return ApiError(413, f"body: {size} bytes exceed the limit of {self.limit} bytes (max_request_bytes)",
                        param="body", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._too_large(length.decode("latin-1")).response(route_path(scope))(scope, receive, send)
            return
        # read the whole body up to the limit (chunked uploads carry no length), then replay it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(f"more than {size}").response(route_path(scope))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            # after the body, receive() waits for the client's disconnect as usual
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)
