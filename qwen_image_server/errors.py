"""Errors the server answers with, as values. `api/error_mapping.py` maps them to HTTP in one place.

Each carries its HTTP status, an OpenAI-style `type`, and optionally the `param` it concerns,
so the wire shape `{"error": {"message", "type", "param", "code"}}` is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class ServerError(Exception):
    """Base of every error a client may see."""

    status_code: int = 500
    type: str = "server_error"
    headers: ClassVar[Mapping[str, str]] = {}  # response headers every error of this kind carries

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled with its fields (it crosses from an engine process to the front as it is).
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after))


def _rebuild(kind: type[ServerError], message: str, param: str | None, code: str | None,
             retry_after: float | None) -> ServerError:
    return kind(message, param=param, code=code, retry_after=retry_after)


class InvalidRequest(ServerError):
    status_code = 400
    type = "invalid_request_error"


class LoraUnusable(InvalidRequest):
    """A LoRA the request named cannot run: not a LoRA, for another base model, or its first load
    failed (then it stays marked unusable in /v1/loras until its file changes)."""

    def __init__(self, message: str, *, param: str | None = "loras", code: str | None = "lora_unusable",
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class LoraUnavailable(ServerError):
    """A hub LoRA the request named could not be fetched because the hub or the network is down:
    nothing is wrong with the request or the LoRA (it is not marked unusable); try again later."""

    status_code = 503
    type = "lora_unavailable"

    def __init__(self, message: str, *, param: str | None = "loras", code: str | None = "lora_unavailable",
                 retry_after: float | None = 30.0) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class AuthenticationError(ServerError):
    """No API key, or not one of the server's keys."""

    status_code = 401
    type = "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}


class CrossOriginRefused(ServerError):
    """A state-changing request sent by a page of another site (its Origin or Referer), which the
    server does not allow: a browser would otherwise let any web page its user visits drive it."""

    status_code = 403
    type = "permission_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "cross_origin_request",
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class HostNotAllowed(InvalidRequest):
    """The Host header is none of the names the server answers to (DNS rebinding sends the
    attacker's own name)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "host_not_allowed",
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class WebhookUrlNotAllowed(InvalidRequest):
    """A job's webhook_url the server may not call: not http(s), or a host that is not public
    (loopback, private, link-local, ...) and not in QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS, or a name
    that does not resolve."""

    def __init__(self, message: str, *, param: str | None = "webhook_url", code: str | None = "webhook_url_not_allowed",
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class NotFound(ServerError):
    status_code = 404
    type = "not_found"


class RequestTooLarge(ServerError):
    status_code = 413
    type = "request_too_large"


class RequestTimeout(ServerError):
    """The client did not send its whole request body in time (`request_read_timeout_s`)."""

    status_code = 408
    type = "request_timeout"


class JobNotReady(ServerError):
    """The job has no image (yet, or ever)."""

    status_code = 409
    type = "job_not_ready"


class QueueFull(ServerError):
    status_code = 429
    type = "queue_full"


class RateLimited(ServerError):
    """An API key is over one of its limits (jobs in flight, requests per minute, subscribers)."""

    status_code = 429
    type = "rate_limit_exceeded"


class InsufficientStorage(ServerError):
    """The output folder's disk is below its free-space floor (QWEN_IMAGE_MIN_FREE_DISK_MB): a
    request that asked to save its image is refused before any work. Requests that save nothing
    are still served."""

    status_code = 507
    type = "insufficient_storage"

    def __init__(self, message: str, *, param: str | None = "save_to_file", code: str | None = "low_disk_space",
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class SaveFailed(ServerError):
    """Writing a finished image to the output folder failed (disk full, folder unwritable, ...).
    Never answered as an error: the image is still delivered, and this names why no file was
    made (`save_error` of /generate's JSON and of a job's status)."""

    status_code = 507
    type = "save_failed"

    def __init__(self, message: str, *, param: str | None = "save_to_file", code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class InferenceFailed(ServerError):
    """The pipeline raised for this batch; the server itself is fine."""

    status_code = 500
    type = "inference_error"


ENGINE_TIMEOUT = "engine_timeout"  # the code of every error an engine hung past its batch deadline causes


class EngineTimeout(InferenceFailed):
    """The engine hung past its batch deadline (QWEN_IMAGE_BATCH_TIMEOUT_S) on this job, after
    failing on it once already: it was killed and restarted twice, and the job is the likely
    cause, so it fails rather than being retried a third time (500: retrying it is no cure)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = ENGINE_TIMEOUT,
                 retry_after: float | None = None) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)


class ShuttingDown(ServerError):
    status_code = 503
    type = "shutting_down"


class OutOfMemory(ServerError):
    """The device ran out of memory even for this job alone."""

    status_code = 503
    type = "out_of_memory"


class EngineDead(ServerError):
    """A device error left the accelerator unusable; the worker is restarting."""

    status_code = 503
    type = "engine_unavailable"


class StoreUnavailable(ServerError):
    """The shared job store (Redis) cannot be reached: an async job cannot be kept, so it is not
    queued; requests that wait for their image are still served."""

    status_code = 503
    type = "store_unavailable"


class QueueTimeout(ServerError):
    status_code = 504
    type = "queue_timeout"


class JobCancelled(ServerError):
    """The job was cancelled (by its client, or because the client went away)."""

    status_code = 499
    type = "cancelled"


class ModelLoadError(Exception):
    """Loading the model failed; the message is the one paragraph printed before exiting."""


class OptionUnavailable(ModelLoadError):
    """A memory or speed option cannot work here (package, hardware or value); found at startup."""


class ConfigurationError(Exception):
    """A setting that cannot work on this machine: the server does not start (one line, naming
    the setting)."""
