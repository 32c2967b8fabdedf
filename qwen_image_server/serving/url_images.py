"""Images answered by link (OpenAI's response_format=url) and read back by `GET /v1/images/{id}`.

Without a results URL they live in this process's memory (`ResultStore`), and only this server
knows them. With one (`QWEN_IMAGE_RESULTS_URL`, see `serving/object_store.py`) they go to the
shared storage instead: any server sharing it answers `GET /v1/images/{id}`, for the image's
owner only, and a bucket's link is a presigned URL that the storage serves itself, even once
the server that made the image is gone. A job's image (`job-<id>`) is read from the same storage,
where the job store put it.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import anyio

from qwen_image_server.serving.object_store import ObjectStore, StoredObject, image_key, job_image_key
from qwen_image_server.serving.results import ResultStore, StoredImage

log = logging.getLogger(__name__)

JOB_IMAGE_PREFIX = "job-"  # `GET /v1/images/job-<id>`: a job's image


@dataclass(frozen=True, slots=True)
class KeptImage:
    id: str
    link: str | None  # where the storage serves it itself (a presigned URL); None: the server's own link


class UrlImages:
    def __init__(self, memory: ResultStore, objects: ObjectStore | None, ttl_s: float) -> None:
        self.memory = memory
        self.objects = objects
        self.ttl_s = ttl_s

    async def keep(self, data: bytes, media_type: str, owner: str | None) -> KeptImage:
        """Keep an image for `owner` for the TTL. A storage that fails (down, full, refused) loses
        nothing: the image is kept in memory instead, and this server's own link serves it."""
        if self.objects is not None:
            image_id = self.memory.new_id()
            key = image_key(image_id)
            try:
                await anyio.to_thread.run_sync(functools.partial(
                    self.objects.put, key, data, media_type, owner=owner, expires_at=time.time() + self.ttl_s))
                link = await anyio.to_thread.run_sync(self.objects.url, key, self.ttl_s)
            except self.objects.failures as exc:  # any storage failure: the image is still delivered
                log.warning("keeping an image in %s failed (%s: %s); it is kept in this server's memory",
                            self.objects.location, type(exc).__name__, exc)
            else:
                return KeptImage(image_id, link)
        return KeptImage(self.memory.put(data, media_type, owner=owner).id, None)

    async def find(self, image_id: str, owner: str | None) -> StoredImage | None:
        """`owner`'s image: from memory, else from the shared storage (a `url` image, or a job's
        image); None when unknown, expired or another key's."""
        stored = self.memory.get(image_id, owner)
        if stored is not None or self.objects is None:
            return stored
        key = (job_image_key(image_id.removeprefix(JOB_IMAGE_PREFIX)) if image_id.startswith(JOB_IMAGE_PREFIX)
               else image_key(image_id))
        found: StoredObject | None = await anyio.to_thread.run_sync(self.objects.get, key, time.time())
        if found is None or found.owner != owner:
            return None
        return StoredImage(image_id, found.data, found.media_type, created=time.time(), expires_at=float("inf"),
                           owner=found.owner)
