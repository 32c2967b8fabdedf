"""The request body limit (`max_body_bytes`): 413 `request_too_large`, in the common error shape.

Starlette's `RequestBodyLimitMiddleware` counts the bytes a route actually reads, which covers
chunked bodies (no Content-Length) and clients whose Content-Length lies; its 413 is an
HTTPException, so the app's handler gives it the common shape. A body that *declares* a length
over the limit it answers with plain text, though, so `DeclaredBodyLimit`, placed in front of
it, refuses those before anything reads a byte.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_image_server import errors
from qwen_image_server.api.errors import server_error_response


class DeclaredBodyLimit:
    """Answer 413 at once when Content-Length is over the limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                error = errors.RequestTooLarge(
                    f"The request body is {int(declared)} bytes; this server accepts at most "
                    f"{self.max_body_bytes}.", code="body_too_large")
                await server_error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def add_body_limit(app: FastAPI, max_body_bytes: int) -> None:
    """Limit every route's request body (add before middleware that should run first)."""
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)
    app.add_middleware(DeclaredBodyLimit, max_body_bytes=max_body_bytes)
