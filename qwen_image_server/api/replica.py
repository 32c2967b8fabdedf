"""One app among several replicas (Ray Serve, `launch/ray_app.py`): its name on responses and in ids.

Jobs live in the memory of the replica that made them (`url` images too, unless
QWEN_IMAGE_RESULTS_URL puts them in shared storage, which any replica reads), so a request that names
one (`GET /v1/jobs/<id>`, its events, image and cancel; `GET /v1/images/<id>`) must reach that
replica. Every such id starts with the replica's name and a dot (`<replica>.<random>`); a router
reads the owner off the path (`owner_in_path`) without any shared state. A replica's name is
Ray's replica tag (lowercase letters and digits), so the first dot always ends it.

Nothing here imports Ray: the plain server uses none of it, and the router imports this module.
"""

from __future__ import annotations

from collections.abc import Container

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "X-Replica"
_SEPARATOR = "."


def id_prefix(replica: str | None) -> str:
    """What every id a replica hands out starts with ("" on a plain server)."""
    return f"{replica}{_SEPARATOR}" if replica else ""


def owner_in_path(path: str, replicas: Container[str]) -> str | None:
    """The replica (one of `replicas`) named by an id in `path`, or None.

    Any path segment `<replica>.<rest>` whose `<replica>` is live counts, so every route that
    takes an id (today's and future ones) is covered; a saved file's name (`Qwen-Image-...png`)
    never starts with a replica's name.
    """
    for segment in path.split("/"):
        name, dot, rest = segment.partition(_SEPARATOR)
        if dot and rest and name in replicas:
            return name
    return None


class ReplicaHeaderMiddleware:
    """Name the replica on every response (`X-Replica: <replica>`), errors included."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REPLICA_HEADER] = self.replica
            await send(message)

        await self.app(scope, receive, send_with_replica)
