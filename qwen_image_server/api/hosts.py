"""Host allowlist (`QWEN_IMAGE_ALLOWED_HOSTS`): 400 `invalid_request_error` (code
`host_not_allowed`) for a Host header that is none of the server's names.

DNS rebinding points a name the attacker owns at the server's address, so that the attacker's
page, loaded from that name, counts as same-origin and can read the server's answers; its
requests still carry the attacker's name in Host. Starlette's TrustedHostMiddleware decides
(patterns, `*.domain`, IPv6 literals); this only answers its refusal in the common error shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_image_server import errors
from qwen_image_server.api.error_mapping import server_error_response

log = logging.getLogger(__name__)

_PASSED = "qwen_image.host_allowed"  # scope key set when TrustedHostMiddleware lets a request through


async def _mark_passed(scope: Scope, receive: Receive, send: Send) -> None:
    scope[_PASSED] = True


async def _discard(message: Message) -> None:
    """TrustedHostMiddleware's own plain-text refusal: replaced by the common shape."""


class HostAllowlist:
    """Requests whose Host matches `allowed_hosts` go on; others get 400 in the common shape
    (a WebSocket handshake is closed with 1008, policy violation)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.check = TrustedHostMiddleware(_mark_passed, allowed_hosts=allowed_hosts, www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        await self.check(scope, receive, _discard)
        if scope.pop(_PASSED, False):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        host = Headers(scope=scope).get("host", "")
        shown = host if len(host) <= 200 else f"{host[:200]}..."
        log.debug("400 for %s %s: Host %r is not allowed", scope["method"], scope["path"], shown)
        error = errors.HostNotAllowed(
            f"This server does not answer to the name {shown!r} (the Host header); the names it answers "
            "to are set in QWEN_IMAGE_ALLOWED_HOSTS.")
        await server_error_response(error)(scope, receive, send)

