"""Jobs the job store kept that no server is running: after a restart, every job that had not
ended is queued again (a job that was running starts from the beginning; one that was running
at two restarts fails instead); with a store shared by several servers, the jobs of a server
whose lease lapsed are adopted the same way. Each is prepared again from its stored request
(same parameters, seed, uploads, owner) and followed by the registry like any new job."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from qwen_image_server import errors
from qwen_image_server.config.api_keys import ANONYMOUS, Caller
from qwen_image_server.job_state import JobState
from qwen_image_server.protocol.common import ErrorDetail
from qwen_image_server.protocol.native import (
    EditJobParameters,
    JobProgress,
    JobRequest,
    JobStatus,
    LayeredJobParameters,
)
from qwen_image_server.scheduler import Job
from qwen_image_server.serving.generation import Prepared
from qwen_image_server.serving.job_store import StoredJob

if TYPE_CHECKING:
    from qwen_image_server.serving.job_registry import JobRegistry

log = logging.getLogger(__name__)


class JobRecovery:
    """Queues again the stored jobs this server is handed, through `registry`."""

    def __init__(self, registry: JobRegistry) -> None:
        self.registry = registry

    async def recover(self) -> int:
        """After a restart: queue again every job the store kept that had not ended (a job that
        was running starts from the beginning; one that already started twice fails instead),
        oldest first. Returns how many were queued."""
        store = self.registry.store
        if store is None:
            return 0
        self.registry.generation.continue_request_ids(await store.call(store.store.last_request_id))
        return await self.adopt()

    async def share(self) -> None:
        """With a shared store: start the exchange (lease, relay, remote cancels); it adopts the
        jobs of servers whose lease lapsed, now and at every renewal."""
        if self.registry.exchange is not None:
            await self.registry.exchange.start(self.adopt, self.registry.cancel_here)

    async def unshare(self) -> None:
        if self.registry.exchange is not None:
            await self.registry.exchange.stop()

    async def adopt(self) -> int:
        """Queue the unfinished jobs the store hands this server (after a restart, every one it
        kept; with a shared store, those of servers whose lease lapsed). Returns how many."""
        if self.registry.store is None:
            return 0
        store = self.registry.store
        queued = 0
        for stored in await store.call(store.store.unfinished):
            try:
                prepared = await self._prepare_again(stored)
            except errors.ServerError as exc:  # it cannot run here any more (a LoRA or model gone)
                log.warning("job %s from before the restart cannot run again: %s", stored.id, exc.message)
                await store.call(store.store.finished, stored.id, JobState.FAILED,
                                 _lost_status(stored, ErrorDetail.of(exc)), time.time() + self.registry.ttl_s,
                                 None, None)
                continue
            body = prepared.body
            if stored.cancelled:  # its client cancelled it while no server ran it
                self._fail_again(stored, prepared, errors.JobCancelled("The job was cancelled."))
                continue
            if stored.runs >= 2:  # it was running at two restarts: do not try a third time
                self._fail_again(stored, prepared, errors.InferenceFailed(
                    "The server restarted twice while this job was running; it is not run again."))
                continue
            [job] = await self.registry.generation.submit(prepared, ids=[stored.id], readmit=True)
            self.registry.follow(job, body, stored.created_at, stored.request_id, stored.base_url, stored.webhook_url)
            queued += 1
        if queued:
            log.info("%d job%s from before the restart queued again", queued, "" if queued == 1 else "s")
        return queued

    async def _prepare_again(self, stored: StoredJob) -> Prepared[Any]:
        """A stored job's request, prepared as it was (same parameters, seed, uploads, owner)."""
        caller = Caller(stored.owner) if stored.owner else ANONYMOUS
        if stored.task == "edit":
            edit = EditJobParameters.model_validate_json(stored.body)
            assert self.registry.store is not None
            images, mask = await self.registry.store.call(self.registry.store.store.uploads, stored.id)
            return await self.registry.generation.prepare(edit, "edit", model=edit.model, images=images, mask=mask,
                                                 preview=edit.preview_plan(), caller=caller, readmit=True)
        if stored.task == "layered":
            layered = LayeredJobParameters.model_validate_json(stored.body)
            assert self.registry.store is not None
            images, _ = await self.registry.store.call(self.registry.store.store.uploads, stored.id)
            return await self.registry.generation.prepare(layered, "layered", model=layered.model, images=images,
                                                 preview=layered.preview_plan(), caller=caller, readmit=True,
                                                 layers=layered.layers, resolution=layered.resolution)
        body = JobRequest.model_validate_json(stored.body)
        return await self.registry.generation.prepare(body, "generate", preview=body.preview_plan(), caller=caller,
                                             readmit=True)

    def _fail_again(self, stored: StoredJob, prepared: Prepared[Any], error: errors.ServerError) -> None:
        """End a stored job with `error` through the usual path (its status and the store say it)."""
        job = Job(spec=prepared.specs[0], request_id=stored.request_id, submitted_at=0.0, deadline=0.0,
                  id=stored.id, owner=stored.owner, state=JobState.FAILED,
                  total_steps=prepared.specs[0].num_inference_steps)
        job.future.set_exception(error)
        self.registry.follow(job, prepared.body, stored.created_at, stored.request_id, stored.base_url,
                             stored.webhook_url)


def _lost_status(stored: StoredJob, error: ErrorDetail) -> str:
    """The final status of a stored job that could not even be prepared again."""
    return JobStatus(id=stored.id, status=JobState.FAILED, queue_position=None, progress=JobProgress(step=0, total=0),
                     request_id=stored.request_id, created_at=stored.created_at, finished_at=time.time(),
                     width=0, height=0, seed=0, error=error).model_dump_json()
