"""Jobs, their images and webhook deliveries in a Redis every server and replica shares
(`QWEN_IMAGE_STORE=redis://host:port/db`): any of them answers any job.

Keys (all under `qwen-image:`; one Redis database per deployment, not a Redis Cluster, since the
scripts below touch keys they compute):

- `job:<id>`: a hash, the job (`StoredJob`'s fields, plus `runner`, the server running it, and
  `live`, the status its runner published last). Once the job ended it expires a week after
  its TTL (the tombstone that answers "expired").
- `job:<id>:inputs`: an unfinished edit's uploads, deleted when it ends.
- `image:<id>`: a finished job's image, when no `QWEN_IMAGE_RESULTS_URL` is set; it expires
  with its TTL. Redis holds it in memory: about 1-2 MB per 1024x1024 PNG, for the TTL.
- `layers:<id>`: a finished layered job's ZIP of layers, kept like its image (its TTL; in the
  results storage instead when `QWEN_IMAGE_RESULTS_URL` is set).
- `runners`: the servers that hold (or held) a lease; `lease:<runner>`: the lease, renewed every
  third of `QWEN_IMAGE_STORE_LEASE_S`; `runner:<runner>:jobs`: the unfinished jobs it runs.
- `events:<id>` (pub/sub): the job's events, published by its runner; `cancel` (pub/sub): job
  ids to cancel, heard by every server.
- `webhooks:due` (sorted by the next try) and `webhook:<id>`: the webhook outbox.
- `request-id`: the highest request id handed out; `webhook-secret`: the shared signing secret.

`RedisJobStore` blocks (the job registry calls it on the store's thread, as it does SQLite);
`RedisExchange` and `RedisOutbox` run on the event loop (redis-py's asyncio client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from qwen_image_server import errors
from qwen_image_server.job_state import JobEvent, JobState
from qwen_image_server.protocol.native import JobPreview, JobStatus
from qwen_image_server.serving.job_exchange import Relayed
from qwen_image_server.serving.job_store import TOMBSTONE_S, StoredJob, StoredTask, unwritable
from qwen_image_server.serving.layers import ZIP_MEDIA_TYPE
from qwen_image_server.serving.object_store import ObjectStore, job_image_key, job_layers_key
from qwen_image_server.serving.uploads import Upload
from qwen_image_server.serving.webhook_outbox import Delivery

log = logging.getLogger(__name__)

PREFIX = "qwen-image:"
_FIELDS = ("owner", "task", "body", "request_id", "created_at", "state", "runs", "status", "media_type",
           "expires_at", "base_url", "webhook_url", "cancel")
UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)

# Adopt the jobs of every server whose lease lapsed: atomically, so one server only adopts them.
_ADOPT = """
local me, p = ARGV[1], ARGV[2]
local adopted = {}
for _, runner in ipairs(redis.call('SMEMBERS', p .. 'runners')) do
  if runner ~= me and redis.call('EXISTS', p .. 'lease:' .. runner) == 0 then
    local jobs = p .. 'runner:' .. runner .. ':jobs'
    for _, id in ipairs(redis.call('SMEMBERS', jobs)) do
      if redis.call('HEXISTS', p .. 'job:' .. id, 'state') == 1 then
        redis.call('SADD', p .. 'runner:' .. me .. ':jobs', id)
        redis.call('HSET', p .. 'job:' .. id, 'runner', me)
        table.insert(adopted, id)
      end
    end
    redis.call('DEL', jobs)
    redis.call('SREM', p .. 'runners', runner)
  end
end
return adopted
"""

# Only ever raise the highest request id.
_MAX = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
"""

# A start counts only for a job not ended (a cancel may have ended it meanwhile).
_STARTED = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HINCRBY', KEYS[1], 'runs', 1)
end
"""

# Claim the webhook deliveries due: each moved past its claim's end, by one server only.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  local d = redis.call('HMGET', ARGV[4] .. id, 'job_id', 'url', 'payload', 'created_at', 'attempts')
  table.insert(out, id)
  for _, v in ipairs(d) do table.insert(out, v) end
end
return out
"""


def connect(url: str) -> redis.Redis:
    """A blocking client (bytes in, bytes out)."""
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30)


def connect_async(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=10, health_check_interval=30)


def new_runner(replica: str | None) -> str:
    """This server's name for its lease: fresh at every start (a restarted server is a new one,
    and the jobs of the one before are adopted like any dead server's)."""
    return f"{replica or 'server'}-{secrets.token_hex(6)}"


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8") if value is not None else None


class RedisJobStore:
    """The `JobStore` on Redis. `images`: where finished images go (QWEN_IMAGE_RESULTS_URL);
    None: into Redis itself, with their TTL."""

    def __init__(self, url: str, runner: str, images: ObjectStore | None = None) -> None:
        self.runner = runner
        self.images = images
        self._redis = connect(url)
        self._redis.ping()  # a wrong URL or a Redis down is said at the start
        self._adopt = self._redis.register_script(_ADOPT)
        self._max = self._redis.register_script(_MAX)
        self._started = self._redis.register_script(_STARTED)

    def add(self, job: StoredJob, uploads: Sequence[Upload], mask: Upload | None) -> None:
        fields: dict[str, str | int | float] = {
            "owner": job.owner or "", "task": job.task, "body": job.body, "request_id": job.request_id,
            "created_at": repr(job.created_at), "state": job.state.value, "runs": job.runs, "runner": self.runner,
            "base_url": job.base_url or "", "webhook_url": job.webhook_url or ""}
        pipe = self._redis.pipeline(transaction=True)
        if uploads or mask is not None:
            inputs: dict[str, bytes] = {f"image-{index}": _packed(upload) for index, upload in enumerate(uploads)}
            if mask is not None:
                inputs["mask"] = _packed(mask)
            inputs["names"] = json.dumps([upload.field for upload in uploads]).encode()
            pipe.hset(f"{PREFIX}job:{job.id}:inputs", mapping=inputs)
        pipe.hset(f"{PREFIX}job:{job.id}", mapping=fields)
        pipe.sadd(f"{PREFIX}runner:{self.runner}:jobs", job.id)
        self._max(keys=[f"{PREFIX}request-id"], args=[job.request_id], client=pipe)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.error("job %s could not be stored in Redis: %s", job.id, exc)
            raise errors.StoreUnavailable("The server cannot reach its job store (Redis) to keep this job, so it "
                                          "was not queued; try again shortly.", retry_after=5) from exc
        except redis.exceptions.OutOfMemoryError as exc:
            # Redis at its maxmemory (with a policy that evicts nothing, as a job store needs).
            log.error("job %s could not be stored in Redis: %s", job.id, exc)
            raise unwritable("Redis (QWEN_IMAGE_STORE) is out of memory") from exc

    def remove(self, job_id: str) -> None:
        self._redis.delete(f"{PREFIX}job:{job_id}", f"{PREFIX}job:{job_id}:inputs")
        self._redis.srem(f"{PREFIX}runner:{self.runner}:jobs", job_id)

    def started(self, job_id: str) -> None:
        self._started(keys=[f"{PREFIX}job:{job_id}"])

    def finished(self, job_id: str, state: JobState, status: str, expires_at: float,
                 image: bytes | None, media_type: str | None, layers: bytes | None = None) -> None:
        key = f"{PREFIX}job:{job_id}"
        owner, runner = cast(list[bytes | None], self._redis.hmget(key, ["owner", "runner"]))
        if layers is not None:  # before the image: a job whose image is there has its layers too
            if self.images is not None:
                self.images.put(job_layers_key(job_id), layers, ZIP_MEDIA_TYPE, owner=_text(owner) or None,
                                expires_at=expires_at)
            else:
                self._redis.set(f"{PREFIX}layers:{job_id}", layers, pxat=int(expires_at * 1000))
        if image is not None:
            if self.images is not None:
                self.images.put(job_image_key(job_id), image, media_type or "image/png",
                                owner=_text(owner) or None, expires_at=expires_at)
            else:
                self._redis.set(f"{PREFIX}image:{job_id}", image, pxat=int(expires_at * 1000))
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": state.value, "status": status, "media_type": media_type or "",
                                "expires_at": repr(expires_at)})
        pipe.hdel(key, "live")
        pipe.pexpireat(key, int((expires_at + TOMBSTONE_S) * 1000))
        pipe.delete(f"{key}:inputs")
        pipe.srem(f"{PREFIX}runner:{_text(runner) or self.runner}:jobs", job_id)
        pipe.execute()

    def get(self, job_id: str) -> StoredJob | None:
        values = cast(list[bytes | None], self._redis.hmget(f"{PREFIX}job:{job_id}", list(_FIELDS)))
        if values[_FIELDS.index("state")] is None:
            return None
        return _job(job_id, dict(zip(_FIELDS, values, strict=True)))

    def image(self, job_id: str) -> bytes | None:
        if self.images is not None:
            stored = self.images.get(job_image_key(job_id), time.time())
            return stored.data if stored is not None else None
        return cast(bytes | None, self._redis.get(f"{PREFIX}image:{job_id}"))

    def layers(self, job_id: str) -> bytes | None:
        if self.images is not None:
            stored = self.images.get(job_layers_key(job_id), time.time())
            return stored.data if stored is not None else None
        return cast(bytes | None, self._redis.get(f"{PREFIX}layers:{job_id}"))

    def uploads(self, job_id: str) -> tuple[list[Upload], Upload | None]:
        inputs = cast(dict[bytes, bytes], self._redis.hgetall(f"{PREFIX}job:{job_id}:inputs"))
        if not inputs:
            return [], None
        names: list[str] = json.loads(inputs[b"names"])
        images = [_unpacked(inputs[f"image-{index}".encode()], name) for index, name in enumerate(names)]
        mask = _unpacked(inputs[b"mask"], "mask") if b"mask" in inputs else None
        return images, mask

    def unfinished(self) -> list[StoredJob]:
        """The jobs of servers whose lease lapsed, now this one's (oldest first): the jobs of a
        live server are never answered."""
        adopted = cast(list[bytes], self._adopt(args=[self.runner, PREFIX]))
        jobs = [job for job in (self.get(raw.decode()) for raw in adopted) if job is not None]
        if jobs:
            log.info("adopted %d unfinished job%s of servers whose lease lapsed", len(jobs),
                     "" if len(jobs) == 1 else "s")
        return sorted((job for job in jobs if job.state.value in UNFINISHED), key=lambda job: job.created_at)

    def last_request_id(self) -> int:
        return int(cast(bytes | None, self._redis.get(f"{PREFIX}request-id")) or 0)

    def sweep(self, now: float) -> int:
        """Nothing to do: Redis expires the images and the tombstones itself."""
        return 0

    def close(self) -> None:
        self._redis.close()


def _task(value: str | None) -> StoredTask:
    """A stored job's task as written (an unknown one reads as a generation, as before)."""
    return "edit" if value == "edit" else "layered" if value == "layered" else "generate"


def _job(job_id: str, raw: dict[str, bytes | None]) -> StoredJob:
    values = {name: _text(value) for name, value in raw.items()}
    expires_at = values["expires_at"]
    return StoredJob(
        id=job_id, owner=values["owner"] or None, task=_task(values["task"]),
        body=values["body"] or "{}", request_id=int(values["request_id"] or 0),
        created_at=float(values["created_at"] or 0), state=JobState(values["state"]), runs=int(values["runs"] or 0),
        status=values["status"], media_type=values["media_type"] or None,
        expires_at=float(expires_at) if expires_at else None,
        expired=bool(expires_at) and float(expires_at or 0) <= time.time(),
        base_url=values["base_url"] or None, webhook_url=values["webhook_url"] or None,
        cancelled=values["cancel"] == "1")


def _packed(upload: Upload) -> bytes:
    # A marker says which kind it was (raw bytes, or base64 text from a JSON body).
    if isinstance(upload.data, str):
        return b"t" + upload.data.encode("ascii")
    return b"b" + upload.data


def _unpacked(raw: bytes, name: str) -> Upload:
    return Upload(name, raw[1:].decode("ascii") if raw[:1] == b"t" else raw[1:])


class RedisExchange:
    """The `JobExchange` on Redis: the lease, the relay of events (pub/sub), remote cancels."""

    def __init__(self, url: str, runner: str, lease_s: float) -> None:
        self.runner = runner
        self.lease_s = lease_s
        self._redis = connect_async(url)
        self._outgoing: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, adopt: Callable[[], Awaitable[int]], cancel_here: Callable[[str], bool]) -> None:
        await self._renew()
        self._tasks = [asyncio.create_task(self._keep_lease(adopt)),
                       asyncio.create_task(self._hear_cancels(cancel_here)),
                       asyncio.create_task(self._send())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(redis.RedisError, OSError):
            # Let go at once: what is left unfinished here is adopted now, not a lease later.
            await self._redis.delete(f"{PREFIX}lease:{self.runner}")
        await self._redis.aclose()

    async def _renew(self) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(f"{PREFIX}runners", self.runner)
        pipe.set(f"{PREFIX}lease:{self.runner}", "1", px=int(self.lease_s * 1000))
        added, _ = await pipe.execute()
        if added and self._tasks:
            # It had lapsed and another server adopted this one's jobs: they may run twice.
            log.error("this server's lease on its jobs lapsed (Redis unreachable, or the process paused, for more "
                      "than QWEN_IMAGE_STORE_LEASE_S=%g s); another server took its unfinished jobs over",
                      self.lease_s)

    async def _keep_lease(self, adopt: Callable[[], Awaitable[int]]) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew()
                await adopt()
            except Exception:  # Redis away for a moment: the next renewal tries again
                log.exception("renewing the job store lease failed")

    async def _hear_cancels(self, cancel_here: Callable[[str], bool]) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(f"{PREFIX}cancel")
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            cancel_here(message["data"].decode())
            except (redis.RedisError, OSError):
                log.exception("listening for cancels failed; listening again in a second")
                await asyncio.sleep(1)

    # -- relay --------------------------------------------------------------------------------

    def publish(self, job_id: str, event: JobEvent, status: JobStatus) -> None:
        self._outgoing.put_nowait((job_id, event.value, status.model_dump_json()))

    def publish_preview(self, job_id: str, encode: Callable[[], Awaitable[JobPreview | None]]) -> None:
        self._outgoing.put_nowait((job_id, JobEvent.PREVIEW.value, encode))

    async def _send(self) -> None:
        """Publish the relay's messages one after another: followers hear them in order."""
        while True:
            job_id, event, data = await self._outgoing.get()
            channel = f"{PREFIX}events:{job_id}"
            try:
                if event == JobEvent.PREVIEW.value:
                    numsub = await self._redis.pubsub_numsub(channel)
                    if not numsub or not numsub[0][1]:
                        continue  # nobody elsewhere follows it: no need to encode it
                    preview = await data()
                    if preview is not None:
                        await self._redis.publish(channel, f"{event}\n{preview.model_dump_json()}")
                    continue
                pipe = self._redis.pipeline(transaction=False)
                if not JobEvent(event).final:
                    pipe.hset(f"{PREFIX}job:{job_id}", "live", data)
                pipe.publish(channel, f"{event}\n{data}")
                await pipe.execute()
            except Exception:  # the job itself goes on; a follower elsewhere misses this event
                log.exception("relaying the %s event of job %s failed", event, job_id)

    async def latest(self, job_id: str) -> JobStatus | None:
        raw = await cast(Awaitable[bytes | None], self._redis.hget(f"{PREFIX}job:{job_id}", "live"))
        return JobStatus.model_validate_json(raw) if raw else None

    async def follow(self, job_id: str, current: Callable[[], Awaitable[JobStatus]]) -> AsyncIterator[Relayed]:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(f"{PREFIX}events:{job_id}")
            status = await current()
            yield JobEvent.entering(status.status), status
            if status.status.final:
                return
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                name, _, data = message["data"].decode().partition("\n")
                event = JobEvent(name)
                if event is JobEvent.PREVIEW:
                    yield event, JobPreview.model_validate_json(data)
                    continue
                yield event, JobStatus.model_validate_json(data)
                if event.final:
                    return

    async def cancel(self, job_id: str, wait_s: float) -> JobStatus | None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(f"{PREFIX}events:{job_id}")
            # Kept with the job too: a server adopting it later does not run it.
            await cast(Awaitable[int], self._redis.hset(f"{PREFIX}job:{job_id}", "cancel", "1"))
            await self._redis.publish(f"{PREFIX}cancel", job_id)
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(wait_s):
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        name, _, data = message["data"].decode().partition("\n")
                        if JobEvent(name).final:
                            return JobStatus.model_validate_json(data)
        return None


class RedisOutbox:
    """The webhook outbox (`webhook_outbox.Outbox`'s interface) in Redis, shared by every server:
    a delivery is claimed by one server at a time (a script), as in SQLite."""

    def __init__(self, url: str) -> None:
        self._redis = connect_async(url)
        self._due = f"{PREFIX}webhooks:due"
        self._claim = self._redis.register_script(_CLAIM)
        self.path = f"Redis {PREFIX}webhooks:due"  # where it is, for messages

    async def open(self) -> int:
        try:
            return int(await self._redis.zcard(self._due))
        except redis.RedisError as exc:
            raise OSError(f"Redis: {exc}") from None

    async def add(self, delivery: Delivery, next_at: float) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(f"{PREFIX}webhook:{delivery.id}", mapping={
            "job_id": delivery.job_id, "url": delivery.url, "payload": delivery.payload,
            "created_at": repr(delivery.created_at), "attempts": delivery.attempts})
        pipe.zadd(self._due, {delivery.id: next_at})
        await pipe.execute()

    async def claim(self, now: float, limit: int, until: float) -> list[Delivery]:
        flat = cast(list[bytes | None], await self._claim(keys=[self._due],
                                                          args=[now, limit, until, f"{PREFIX}webhook:"]))
        deliveries = []
        for at in range(0, len(flat), 6):
            event_id, job_id, url, payload, created_at, attempts = flat[at:at + 6]
            if event_id is None or url is None or payload is None:  # removed meanwhile
                continue
            deliveries.append(Delivery(event_id.decode(), (job_id or b"").decode(), url.decode(), payload,
                                       float(created_at or 0), int(attempts or 0)))
        return deliveries

    async def next_try(self) -> float | None:
        first = await self._redis.zrange(self._due, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def retry(self, delivery: Delivery, next_at: float, error: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(f"{PREFIX}webhook:{delivery.id}", mapping={"attempts": delivery.attempts, "last_error": error})
        pipe.zadd(self._due, {delivery.id: next_at}, xx=True)
        await pipe.execute()

    async def remove(self, delivery: Delivery) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(f"{PREFIX}webhook:{delivery.id}")
        pipe.zrem(self._due, delivery.id)
        await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def shared_webhook_secret(url: str, make: Callable[[], str]) -> str:
    """The webhook signing secret every server sharing the Redis uses: the first one to start
    makes it (`make()`), the others read it. Blocks: run it on a thread."""
    client = connect(url)
    try:
        client.set(f"{PREFIX}webhook-secret", make(), nx=True)
        return cast(bytes, client.get(f"{PREFIX}webhook-secret")).decode()
    finally:
        client.close()
