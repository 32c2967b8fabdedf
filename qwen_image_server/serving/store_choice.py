"""Which job store `QWEN_IMAGE_STORE` picks, and what comes with it: SQLite in the data folder
(the default), none (memory), or a Redis shared by every server, with its exchange (lease,
relay, remote cancels), its webhook outbox and its shared webhook secret."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from qwen_image_server.config.settings import Settings
from qwen_image_server.errors import ConfigurationError
from qwen_image_server.serving.job_exchange import JobExchange
from qwen_image_server.serving.job_store import AsyncJobStore, SqliteJobStore
from qwen_image_server.serving.object_store import ObjectStore
from qwen_image_server.serving.webhook_outbox import Outbox


@dataclass(frozen=True)
class Stores:
    jobs: AsyncJobStore | None  # None: jobs live in memory only
    exchange: JobExchange | None = None  # with a store other servers share
    outbox: Outbox | None = None  # None: the webhook outbox in the data folder
    # The webhook secret every server sharing the store uses, made by the first (given how to
    # make one), when QWEN_IMAGE_WEBHOOK_SECRET is unset; None: this server's own, in data_dir.
    webhook_secret: Callable[[Callable[[], str]], str] | None = None


def open_stores(settings: Settings, objects: ObjectStore | None, replica: str | None) -> Stores:
    """The stores the settings name (blocks: run it on a thread). ConfigurationError, one line,
    when the store cannot be used."""
    if settings.store == "memory":
        return Stores(None)
    if settings.store == "sqlite":
        return Stores(AsyncJobStore(SqliteJobStore(settings.data_dir, objects)))
    url = str(settings.store)
    redis_store = _redis_store(url)
    runner = redis_store.new_runner(replica)
    try:
        jobs = redis_store.RedisJobStore(url, runner, objects)
    except redis_store.redis.RedisError as exc:
        raise ConfigurationError(f"QWEN_IMAGE_STORE={_without_password(url)}: cannot reach Redis ({exc})") from None
    return Stores(AsyncJobStore(jobs), redis_store.RedisExchange(url, runner, settings.store_lease_s),
                  redis_store.RedisOutbox(url), lambda make: redis_store.shared_webhook_secret(url, make))


def check_store(settings: Settings) -> None:
    """Before a server starts: ConfigurationError, one line, when the shared store it names
    cannot be used from here (no Redis client, Redis unreachable). Blocks."""
    if settings.store in ("sqlite", "memory"):
        return
    url = str(settings.store)
    redis_store = _redis_store(url)
    try:
        client = redis_store.connect(url)
        try:
            client.ping()
        finally:
            client.close()
    except redis_store.redis.RedisError as exc:
        raise ConfigurationError(f"QWEN_IMAGE_STORE={_without_password(url)}: cannot reach Redis ({exc})") from None


def _redis_store(url: str) -> ModuleType:
    try:
        from qwen_image_server.serving import redis_store
    except ImportError:
        raise ConfigurationError(f"QWEN_IMAGE_STORE={_without_password(url)} needs the Redis client: "
                                 "pip install 'qwen-image-server[redis]' (requirements-redis.txt)") from None
    return redis_store


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{host}" if credentials or at else url
