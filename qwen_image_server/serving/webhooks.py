"""Webhooks: a POST to the job's `webhook_url` (or the operator's default) when a job ends, in the
Standard Webhooks format, delivered at least once.

The event, modelled on OpenAI's: `{"id": "evt_...", "object": "event", "type": "job.succeeded" |
"job.failed" | "job.cancelled", "created_at": <unix>, "data": <the job's status>}`. Each try is
signed afresh (`webhook-id`: the event's id, the same on every try, so receivers drop repeats;
`webhook-timestamp`; `webhook-signature`: `v1,<base64 HMAC-SHA256>` with the `whsec_` secret),
through the `standardwebhooks` library receivers verify with.

The event is written to the outbox (`webhook_outbox.py`) before its first try; a 2xx answer
delivers it, 410 Gone stops it, anything else (another status, a refused connection, a timeout)
is tried again after a backoff that doubles from `webhook_backoff_s` up to 10 minutes (with
jitter), until `webhook_retry_s` after the event; then it is given up. Deliveries pending when
the server stopped (or was killed) are resumed when it starts again.

A webhook calls only hosts it may (`config/webhooks.py`): checked when the job is submitted (a
400 naming `webhook_url`) and again before every try, where the connection goes to the very
address just checked (a name that now resolves elsewhere cannot redirect it), and redirects are
not followed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import secrets
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from qwen_image_server import __version__, errors
from qwen_image_server.config.settings import Settings
from qwen_image_server.config.webhooks import AllowedHosts, check_webhook_secret, parse_ip
from qwen_image_server.job_state import JobState
from qwen_image_server.protocol.native import JobStatus
from qwen_image_server.serving.secret_file import keep_secret
from qwen_image_server.serving.webhook_outbox import Delivery, Outbox, SqliteOutbox

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"
EVENT_TYPES = {JobState.SUCCEEDED: "job.succeeded", JobState.FAILED: "job.failed",
               JobState.CANCELLED: "job.cancelled"}
# What became of a try: delivered (a 2xx answer), retried (it failed; another comes), given_up.
Outcome = Literal["delivered", "retried", "given_up"]
MAX_BACKOFF_S = 600.0
MAX_IN_FLIGHT = 16  # tries at once: a slow receiver holds one of them, not the others
GONE = 410  # the receiver asks for no more


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and 32 random bytes."""
    return f"whsec_{base64.b64encode(secrets.token_bytes(32)).decode()}"


def signing_secret(settings: Settings, shared: Callable[[Callable[[], str]], str] | None = None) -> str:
    """QWEN_IMAGE_WEBHOOK_SECRET, or the one every server sharing the job store uses (`shared`:
    kept there, made by the first), or the one kept in the data folder, made on first use;
    ConfigurationError when the folder cannot hold it or holds something else. Blocks on the
    disk: run it on a thread."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    if shared is not None:
        return shared(new_secret)
    path = settings.data_dir / SECRET_FILE
    try:
        secret = keep_secret(path, lambda: new_secret().encode())
        text = secret.decode("ascii")
        check_webhook_secret(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise errors.ConfigurationError(
            f"QWEN_IMAGE_DATA_DIR: cannot keep the webhook signing secret in {path} ({exc}); make the folder "
            "writable, or set QWEN_IMAGE_WEBHOOK_SECRET") from None
    # Where it is, never what it is: receivers need it to verify the signatures.
    log.info("webhooks are signed with the secret in %s (QWEN_IMAGE_WEBHOOK_SECRET is unset)", path)
    return text


class Unresolved(errors.WebhookUrlNotAllowed):
    """The URL's host did not resolve (in time): at submission a 400 like any other refusal; for a
    delivery, maybe a passing DNS failure, so it is tried again."""


@dataclass(frozen=True)
class Target:
    """A webhook URL as checked: where to connect (the addresses its host resolved to, in order)."""

    url: httpx.URL
    addresses: tuple[str, ...]


class HostCheck:
    """Which URLs a webhook may call: http(s), to hosts whose every address is allowed."""

    def __init__(self, allowed: AllowedHosts, resolve_timeout_s: float) -> None:
        self.allowed = allowed
        self.resolve_timeout_s = resolve_timeout_s

    async def check(self, url: str) -> Target:
        """The URL's target; WebhookUrlNotAllowed (400 naming webhook_url) when the server may not
        call it. The message does not tell why (which addresses a name has, whether it resolves
        at all), so that it teaches a client nothing about the server's network; the log does."""
        message = ("webhook_url must be an http(s) URL of a public host the server can resolve; other hosts "
                   "(loopback, private or link-local addresses, ...) only when the operator lists them in "
                   "QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS.")
        refused = errors.WebhookUrlNotAllowed(message)
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise refused from None
        host = parsed.host
        if parsed.scheme not in ("http", "https") or not host:
            raise refused
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = await self._resolve(host, port)
        if not addresses:
            log.info("webhook URL refused: %s does not resolve", host)
            raise Unresolved(message)
        for address in addresses:
            ip = parse_ip(address)
            if ip is None or not self.allowed.allows(host, ip):
                log.info("webhook URL refused: %s is %s, not public and not in QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS",
                         host, address)
                raise refused
        return Target(parsed, tuple(addresses))

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` (itself for an IP address), in the resolver's order; empty
        when it does not resolve in time. On a thread: the event loop never waits for DNS."""
        if parse_ip(host) is not None:
            return [str(parse_ip(host))]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                                           self.resolve_timeout_s)
        except (OSError, asyncio.TimeoutError):
            return []
        addresses: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = str(sockaddr[0]).split("%")[0]  # an IPv6 scope (fe80::1%eth0) is no part of the address
            if address not in addresses:
                addresses.append(address)
        return addresses


class Webhooks:
    """The server's webhooks: the submit-time check, the outbox, and the sender that tries every
    delivery due (started and stopped with the app)."""

    def __init__(self, settings: Settings, secret: str, on_outcome: Callable[[Outcome], None] = lambda _: None,
                 clock: Callable[[], float] = time.time, outbox: Outbox | None = None) -> None:
        self.default_url = str(settings.webhook_url) if settings.webhook_url is not None else None
        self.timeout_s = settings.webhook_timeout_s
        self.backoff_s = settings.webhook_backoff_s
        self.retry_s = settings.webhook_retry_s
        self.hosts = HostCheck(AllowedHosts.of(settings.webhook_allowed_hosts), settings.webhook_timeout_s)
        self.outbox: Outbox = SqliteOutbox(settings.data_dir) if outbox is None else outbox
        self._signer = Webhook(secret)
        self._on_outcome = on_outcome
        self._clock = clock
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._tries: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the outbox and start sending (deliveries pending from before a restart first)."""
        try:
            pending = await self.outbox.open()
        except (OSError, sqlite3.Error) as exc:
            raise errors.ConfigurationError(
                f"{'QWEN_IMAGE_DATA_DIR' if isinstance(self.outbox, SqliteOutbox) else 'QWEN_IMAGE_STORE'}: "
                f"cannot open the webhook outbox {self.outbox.path} ({exc})") from None
        if pending:
            log.info("resuming %d webhook deliver%s pending from before the restart", pending,
                     "y" if pending == 1 else "ies")
        # Redirects are not followed (the target was checked, the redirect's is not) and no proxy
        # from the environment is used (the connection goes to the address checked). Connections
        # are not kept: they are made to an address, and one made for a host (its TLS certificate
        # checked for that name) must not carry another host's event that shares the address.
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                         timeout=httpx.Timeout(self.timeout_s),
                                         limits=httpx.Limits(max_keepalive_connections=0),
                                         headers={"User-Agent": f"qwen-image-server/{__version__}"})
        self._sender = asyncio.create_task(self._send_due())

    async def stop(self) -> None:
        """Stop sending; a try cut short is tried again after the next start (its claim lapses)."""
        tasks = [*self._tries, *([self._sender] if self._sender else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
        await self.outbox.close()

    # -- jobs -------------------------------------------------------------------------------

    async def url_for(self, requested: str | None) -> str | None:
        """Where a new job's webhook goes: the URL its request names, once checked (400 naming
        webhook_url when the server may not call it), else the operator's default (or none)."""
        if requested is None:
            return self.default_url
        await self.hosts.check(requested)
        return requested

    async def job_ended(self, url: str, status: JobStatus) -> None:
        """Queue the event of a job's end for `url` (written to the outbox before any try). Never
        raises: the job has ended whatever becomes of its webhook."""
        event_type = EVENT_TYPES.get(status.status)
        if event_type is None:
            log.error("job %s: no webhook for a job that is %s", status.id, status.status)
            return
        now = self._clock()
        event_id = f"evt_{secrets.token_hex(16)}"
        event = {"id": event_id, "object": "event", "type": event_type, "created_at": int(now),
                 "data": status.model_dump(mode="json")}
        payload = json.dumps(event, separators=(",", ":")).encode("utf-8")
        try:
            await self.outbox.add(Delivery(event_id, status.id, url, payload, now), next_at=now)
        except Exception:  # a full or broken disk, a stopping server: the job's own answer is not at stake
            log.exception("job %s: its webhook %s (%s) could not be queued", status.id, event_id, event_type)
            return
        log.info("job %s: webhook %s (%s) queued for %s", status.id, event_id, event_type, _shown(url))
        self._wake.set()

    # -- sending ----------------------------------------------------------------------------

    async def _send_due(self) -> None:
        """Forever: claim the deliveries due (as many as there is room for), try each in a task
        of its own, then sleep until the next is due, a new one is queued or a try ends."""
        if self.default_url is not None:
            await self._check_default()
        lease_s = 2 * self.timeout_s + 5  # a try's longest: resolving, then sending
        while True:
            self._wake.clear()
            room = MAX_IN_FLIGHT - len(self._tries)
            delay = 60.0
            try:
                if room > 0:
                    now = self._clock()
                    for delivery in await self.outbox.claim(now, room, until=now + lease_s):
                        task = asyncio.create_task(self._try(delivery))
                        self._tries.add(task)
                        task.add_done_callback(self._try_ended)
                next_at = await self.outbox.next_try()
                if next_at is not None:
                    delay = min(delay, max(0.0, next_at - self._clock()))
            except Exception:  # the disk: try again in a while rather than stop delivering
                log.exception("webhook outbox: reading the deliveries due failed")
                delay = 5.0
            if delay > 0 or room <= 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay if room > 0 else None)

    def _try_ended(self, task: asyncio.Task[None]) -> None:
        self._tries.discard(task)
        self._wake.set()  # room for one more

    async def _try(self, delivery: Delivery) -> None:
        """One try of one delivery, and what follows from it."""
        delivery = Delivery(delivery.id, delivery.job_id, delivery.url, delivery.payload, delivery.created_at,
                            delivery.attempts + 1)
        try:
            target = await self.hosts.check(delivery.url)
        except Unresolved:
            await self._retry(delivery, "its host did not resolve")
            return
        except errors.WebhookUrlNotAllowed:
            await self._give_up(delivery, "its host may not be called (any more): see QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS")
            return
        try:
            status = await asyncio.wait_for(self._post(target, delivery), self.timeout_s)
        except asyncio.TimeoutError:
            problem = f"no answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if 200 <= status < 300:
                await self._finish(delivery, "delivered", f"delivered on try {delivery.attempts}")
                return
            if status == GONE:
                await self._give_up(delivery, "the receiver answered 410 Gone")
                return
            problem = f"HTTP {status}"
        await self._retry(delivery, problem)

    async def _post(self, target: Target, delivery: Delivery) -> int:
        """POST the event to the target's checked addresses, the next one when one cannot be
        connected to (the URL's own host goes in the Host header, and for TLS in SNI and the
        certificate check); the answer's status."""
        for address in target.addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):
                return await self._post_to(address, target.url, delivery)
        return await self._post_to(target.addresses[-1], target.url, delivery)

    async def _post_to(self, address: str, url: httpx.URL, delivery: Delivery) -> int:
        timestamp = datetime.now(tz=timezone.utc)
        headers = {
            "Content-Type": "application/json",
            "Host": url.netloc.decode("ascii"),
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": self._signer.sign(delivery.id, timestamp, delivery.payload),
        }
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        assert self._client is not None, "started"
        request = self._client.build_request("POST", url.copy_with(host=address),
                                             content=delivery.payload, headers=headers, extensions=extensions)
        response = await self._client.send(request, stream=True)  # the answer's body is not read
        await response.aclose()
        return response.status_code

    async def _retry(self, delivery: Delivery, problem: str) -> None:
        now = self._clock()
        backoff = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (delivery.attempts - 1))
        next_at = now + backoff * random.uniform(0.5, 1.0)  # jitter: deliveries that failed together spread out
        if next_at > delivery.created_at + self.retry_s:
            await self._give_up(delivery, f"{problem}, and retries end {self.retry_s:g} s after the event")
            return
        log.info("job %s: webhook %s to %s failed on try %d (%s); next try in %.1f s", delivery.job_id,
                 delivery.id, _shown(delivery.url), delivery.attempts, problem, next_at - now)
        await self._record(self.outbox.retry(delivery, next_at, problem), delivery)
        self._on_outcome("retried")

    async def _give_up(self, delivery: Delivery, why: str) -> None:
        log.warning("job %s: webhook %s to %s given up after %d tr%s: %s", delivery.job_id, delivery.id,
                    _shown(delivery.url), delivery.attempts, "y" if delivery.attempts == 1 else "ies", why)
        await self._finish(delivery, "given_up", None)

    async def _finish(self, delivery: Delivery, outcome: Outcome, note: str | None) -> None:
        if note is not None:
            log.info("job %s: webhook %s to %s %s", delivery.job_id, delivery.id, _shown(delivery.url), note)
        await self._record(self.outbox.remove(delivery), delivery)
        self._on_outcome(outcome)

    async def _record(self, write: Awaitable[None], delivery: Delivery) -> None:
        try:
            await write
        except Exception:  # its claim lapses, and it is tried again: at least once, maybe twice
            log.exception("webhook outbox: recording the try of %s failed", delivery.id)

    async def _check_default(self) -> None:
        """Say at the start when the operator's default URL is one the server may not call."""
        assert self.default_url is not None
        try:
            await self.hosts.check(self.default_url)
        except errors.WebhookUrlNotAllowed:
            log.error("QWEN_IMAGE_WEBHOOK_URL %s: its host does not resolve, or is not public and not in "
                      "QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS; its webhooks will be given up", _shown(self.default_url))


def _shown(url: str) -> str:
    """A URL as the logs show it: without its query, which may carry a receiver's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
