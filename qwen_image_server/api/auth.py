"""API keys: with `api_keys` set, every request but the open paths needs one of them.

A middleware rather than a route dependency, so it guards whatever is added later (routers,
mounted apps, unknown paths alike) and refuses before a body is read. Clients send the key as
`Authorization: Bearer <key>` (what OpenAI clients send) or `X-API-Key: <key>`. Keys are never
logged. A request with a valid key acts as that key's `Caller` (`request.state.caller`): its jobs,
images and files are its own, and its limits apply.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_image_server import errors
from qwen_image_server.api.error_mapping import server_error_response
from qwen_image_server.config.api_keys import ApiKey, Caller

log = logging.getLogger(__name__)

# Probes and scrapers carry no keys; the web page and its assets ask for one in the browser.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
OPEN_PAGE = "/"
OPEN_PREFIXES = ("/static/",)


def is_open(method: str, path: str) -> bool:
    """True for the requests that need no key, whatever the server's keys."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return True
    return path == OPEN_PAGE and method in ("GET", "HEAD")


def presented_keys(headers: Headers) -> list[bytes]:
    """The keys a request carries, as raw header bytes (header values are latin-1 on the wire)."""
    keys = []
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        keys.append(credentials.strip().encode("latin-1"))
    if headers.get("x-api-key", "").strip():
        keys.append(headers["x-api-key"].strip().encode("latin-1"))
    return keys


def matching_key(presented: Sequence[bytes], keys: Sequence[ApiKey]) -> ApiKey | None:
    """The key presented, compared in constant time against every key (no early exit that would
    time which one matched)."""
    found: ApiKey | None = None
    for candidate in presented:
        for key in keys:
            if hmac.compare_digest(candidate, key.secret) and found is None:
                found = key
    return found


class ApiKeyMiddleware:
    """Refuse requests without a valid key with 401 `authentication_error` (common shape); a valid
    one's caller goes into the request's state."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[ApiKey]) -> None:
        self.app = app
        self.keys = list(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys:
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        method = scope.get("method", "WEBSOCKET")
        if is_open(method, path):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(Headers(scope=scope))
        key = matching_key(presented, self.keys)
        if key is not None:
            scope.setdefault("state", {})["caller"] = key.caller
            await self.app(scope, receive, send)
            return
        reason = "invalid" if presented else "missing"
        # Debug only: the access log already shows every 401, and a key guesser would flood it.
        log.debug("401 for %s %s: %s API key", method, path, reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        if presented:
            error = errors.AuthenticationError("The API key is not valid.", code="invalid_api_key")
        else:
            error = errors.AuthenticationError(
                "This server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
                code="missing_api_key")
        await server_error_response(error)(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches (without the root_path a proxy mounts the app under)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def caller_of(scope: Scope) -> Caller | None:
    """The caller the key middleware found for this request (None without keys)."""
    state = scope.get("state") or {}
    caller = state.get("caller")
    return caller if isinstance(caller, Caller) else None
