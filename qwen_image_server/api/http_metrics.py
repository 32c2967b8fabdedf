"""`GET /metrics` and the middleware that counts and times every HTTP request."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_image_server import errors
from qwen_image_server.serving.metrics import ServerMetrics

router = APIRouter()

# The metrics key's only form: Prometheus' scrape config sends `authorization: {credentials: ...}`
# (or `bearer_token`) as `Authorization: Bearer <key>`.
_bearer = HTTPBearer(auto_error=False)


def metrics_access(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With `metrics_key` set, /metrics needs it (401 `authentication_error` otherwise); the API
    keys do not open it, nor does it open anything else. Compared in constant time."""
    key: SecretStr | None = request.app.state.metrics_key
    if key is None:
        return
    if credentials is None:
        raise errors.AuthenticationError(
            "/metrics needs the metrics key: send 'Authorization: Bearer <key>' (QWEN_IMAGE_METRICS_KEY).",
            code="missing_metrics_key")
    # Header values are latin-1 on the wire: compare the bytes the client sent.
    if not hmac.compare_digest(credentials.credentials.encode("latin-1"), key.get_secret_value().encode()):
        raise errors.AuthenticationError("The metrics key is not valid.", code="invalid_metrics_key")


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_access)])
def metrics(request: Request) -> Response:
    """Prometheus exposition (OpenMetrics when the scraper asks for it). Sync: reads files in
    multiprocess mode, so it runs on the threadpool."""
    data, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(data, headers={"Content-Type": content_type})


def route_template(scope: Scope, root_path: str) -> str:
    """The route's template (`/v1/jobs/{job_id}`), never the raw path: labels must stay few.

    Read after routing, from what the router left in the scope: FastAPI names its API route;
    a mount (`/static`) shows in the grown root_path; a plain route (`/docs`) without path
    parameters is its own template. Everything else is "unmatched": unknown paths, and requests
    refused before routing (401 without a key, 413 for a declared size), which may name any path.
    """
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    if "endpoint" in scope:  # routed, to something FastAPI does not name
        mount = scope.get("root_path", "")[len(root_path):]
        if mount:
            return mount
        if not scope.get("path_params"):
            return scope["path"][len(root_path):] or "/"
    return "unmatched"


class HttpMetricsMiddleware:
    """Count each response by method, route template and status, and time it to its start.

    Recorded when the response starts, before the client can read it, so a client that got its
    answer also finds it counted. Outermost user middleware: it sees 401 and 413 too.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        root_path = scope.get("root_path", "")  # as it is before routing adds a mount's prefix
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            self.metrics.observe_request(scope["method"], route_template(scope, root_path), status,
                                         time.perf_counter() - start)

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start" and not recorded:
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            if not recorded:
                record(500)  # Starlette's outermost handler answers it, past this middleware
            raise
