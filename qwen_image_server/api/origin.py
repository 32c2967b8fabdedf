"""Cross-site request refusal: a web page of another site may not make the server do anything.

A browser lets any page send a "simple" cross-site request without asking the server first: a
multipart form POST (the edit routes take those) goes out with the user's network position, so
a page the user visits could run jobs and write files on a server on their machine or LAN.
Browsers say which page sent a request in `Origin` (or, from older code paths, only in
`Referer`), so POST, PUT, PATCH and DELETE from an origin that is neither the server's own
(the one its Host header names, as the web page at `/` sends) nor listed in
`QWEN_IMAGE_ALLOWED_ORIGINS` get 403 `permission_error` before any body is read. A request
without either header does not come from a web page (curl, SDKs, the CLI) and passes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_image_server import errors
from qwen_image_server.api.error_mapping import server_error_response
from qwen_image_server.config.origins import canonical_origin, origin_of_host, referer_origin

log = logging.getLogger(__name__)

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ANY_ORIGIN = "*"


def sending_page(headers: Headers) -> tuple[str, str | None] | None:
    """(what the request says about the page that sent it, its canonical origin or None when it
    is no http(s) origin, e.g. 'null'); None when it says nothing (not sent by a web page)."""
    if "origin" in headers:
        return headers["origin"], canonical_origin(headers["origin"])
    if "referer" in headers:
        return headers["referer"], referer_origin(headers["referer"])
    return None


def own_origin(origin: str, host: str | None) -> bool:
    """True when `origin` is the one the request's Host names: the page came from this server.
    The scheme is the page's own (a TLS proxy in front makes it https while this hop is http)."""
    if host is None:
        return False
    return origin == origin_of_host(origin.split("://", 1)[0], host)


class CrossOriginGuard:
    """403 for state-changing requests sent by pages of other origins (see the module's doc)."""

    def __init__(self, app: ASGIApp, allowed_origins: Collection[str]) -> None:
        self.app = app
        self.allowed = frozenset(allowed_origins)  # canonical (Settings made them so)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING or ANY_ORIGIN in self.allowed:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        page = sending_page(headers)
        if page is None:
            await self.app(scope, receive, send)
            return
        said, origin = page
        if origin is not None and (origin in self.allowed or own_origin(origin, headers.get("host"))):
            await self.app(scope, receive, send)
            return
        shown = said if len(said) <= 200 else f"{said[:200]}..."
        # Debug only: the access log shows every 403, and a page that loops would flood this one.
        log.debug("403 for %s %s sent by a page of %r", scope["method"], scope["path"], shown)
        error = errors.CrossOriginRefused(
            f"This server does not take {scope['method']} requests from pages of other sites (this one came "
            f"from {shown!r}). To allow a site, add its origin to QWEN_IMAGE_ALLOWED_ORIGINS.")
        await server_error_response(error)(scope, receive, send)
