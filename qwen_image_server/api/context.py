"""Per-app state shared by the routers: one request's path, the stores, the process lifecycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from qwen_image_server.api.auth import caller_of
from qwen_image_server.config.api_keys import ANONYMOUS, Caller
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.scheduler import Scheduler
from qwen_image_server.serving.file_links import FileLinks
from qwen_image_server.serving.generation import ClientGone, Generation
from qwen_image_server.serving.job_registry import JobRegistry
from qwen_image_server.serving.lifecycle import Lifecycle
from qwen_image_server.serving.object_store import ObjectStore
from qwen_image_server.serving.results import ResultStore
from qwen_image_server.serving.url_images import UrlImages
from qwen_image_server.serving.webhooks import Webhooks


@dataclass
class ServerContext:
    generation: Generation
    lifecycle: Lifecycle
    results: ResultStore
    jobs: JobRegistry
    files: FileLinks
    webhooks: Webhooks
    images: UrlImages  # url images: in `results`, or in the shared object store
    replica: str | None = None  # this app's name among the replicas of a scaled-out deployment

    @property
    def objects(self) -> ObjectStore | None:
        """The shared object store (QWEN_IMAGE_RESULTS_URL), if any."""
        return self.generation.objects

    @property
    def settings(self) -> Settings:
        return self.generation.settings

    @property
    def device(self) -> DeviceInfo:
        return self.generation.device

    @property
    def scheduler(self) -> Scheduler:
        return self.generation.scheduler


def client_gone(request: Request) -> ClientGone:
    """For `Generation.wait`: completes when the client closes the connection (the body has
    already been read, so the only message left to receive is the disconnect)."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return disconnected


def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: the context of the app serving this request."""
    return request.app.state.ctx


# The type routes declare to receive the context: `ctx: Ctx`.
Ctx = Annotated[ServerContext, Depends(get_context)]


def get_caller(request: Request) -> Caller:
    """FastAPI dependency: whose request this is (the API key's caller; anonymous without keys)."""
    return caller_of(request.scope) or ANONYMOUS


# The type routes declare to know their caller: `caller: Who`.
Who = Annotated[Caller, Depends(get_caller)]
