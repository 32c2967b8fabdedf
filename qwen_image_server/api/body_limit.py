"""Request body limits: 413 `request_too_large` (code `body_too_large`) in the common error shape.

JSON bodies get `max_body_bytes` (small: a prompt and some numbers); the routes that take
uploaded images get `max_upload_bytes`. A body that declares a length over its limit is refused
before a byte is read; a body without Content-Length (chunked), or whose Content-Length lies, is
counted as it arrives and refused the moment it passes the limit, with the same answer.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_image_server import errors
from qwen_image_server.api.error_mapping import server_error_response

# The routes whose bodies carry images.
UPLOAD_PATHS = ("/edit", "/v1/images/edits", "/v1/jobs/edit")


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a route reads its body. An HTTPException, so that FastAPI's
    body parsing passes it on (rather than calling it a malformed body) and the app's handler
    answers it in the common shape."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is over {limit} bytes, the most this route accepts.")


def too_large(declared: int, limit: int) -> errors.RequestTooLarge:
    return errors.RequestTooLarge(
        f"The request body is {declared} bytes; this route accepts at most {limit}.", code="body_too_large")


class BodyLimit:
    """Per-route body limits, for declared and for counted lengths."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int,
                 upload_paths: Collection[str] = UPLOAD_PATHS) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/") or "/"
        limit = self.max_upload_bytes if path in self.upload_paths else self.max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await server_error_response(too_large(int(declared), limit))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def add_body_limit(app: FastAPI, max_body_bytes: int, max_upload_bytes: int) -> None:
    """Limit every route's request body (add before middleware that should run first)."""
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)
