"""The app factory: settings -> scheduler (which loads the model) -> routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from qwen_image_server import __version__
from qwen_image_server.api import (
    file_routes,
    http_metrics,
    job_routes,
    lora_routes,
    native_routes,
    openai_routes,
)
from qwen_image_server.api.auth import ApiKeyMiddleware
from qwen_image_server.api.body_limit import add_body_limit
from qwen_image_server.api.context import ServerContext
from qwen_image_server.api.error_mapping import install_error_handlers
from qwen_image_server.api.hosts import HostAllowlist
from qwen_image_server.api.origin import CrossOriginGuard
from qwen_image_server.api.replica import ReplicaHeaderMiddleware, id_prefix
from qwen_image_server.api.web import install_web
from qwen_image_server.config.checks import (
    check_output_dir,
    engine_gpus,
    warn_if_open,
    warn_missing_lora_dir,
)
from qwen_image_server.config.logs import configure_logging
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import Engine
from qwen_image_server.engine.device import resolve_device
from qwen_image_server.engine.process import engine_factories
from qwen_image_server.scheduler import RestartPolicy, Scheduler, SchedulerConfig, WatchdogConfig
from qwen_image_server.serving.file_links import FileLinks, load_secret
from qwen_image_server.serving.generation import Generation
from qwen_image_server.serving.job_registry import JobRegistry
from qwen_image_server.serving.lifecycle import Lifecycle
from qwen_image_server.serving.metrics import SchedulerMetrics, ServerMetrics
from qwen_image_server.serving.object_store import expire_periodically, open_object_store
from qwen_image_server.serving.output_folder import sweep_periodically
from qwen_image_server.serving.results import ResultStore
from qwen_image_server.serving.store_choice import open_stores
from qwen_image_server.serving.url_images import UrlImages
from qwen_image_server.serving.webhooks import Webhooks, signing_secret

log = logging.getLogger(__name__)
STORE_SWEEP_INTERVAL_S = 60.0  # how often jobs (and shared results) past their TTL are deleted


def real_engine_factory(settings: Settings) -> Callable[[], Engine]:
    """Load the configured pipeline (called on the engine thread, which then owns it)."""

    def load() -> Engine:
        from qwen_image_server.engine.models import load_engine

        return load_engine(settings)

    return load


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: Callable[[], Engine] | None = None,
    engines: Sequence[Callable[[], Engine]] | None = None,
    replica: str | None = None,
) -> FastAPI:
    """Build the ASGI app: the front. The models load in the background once the server starts.

    By default the engines are processes, one per `WORKERS` (each on its own GPU), restarted when
    they die or hang past a batch deadline. `engines` gives other engine factories run the same
    way (restarted when they fail); `engine_factory` gives one engine run in this process, as each
    Ray replica and most tests do (a failed device or a hung batch then ends the process, for its
    manager to start a fresh one).
    Raises ConfigurationError (one line) for settings that cannot work on this machine.

    `replica` names this app among the replicas of a scaled-out deployment (`launch/ray_app.py`): it
    shows in /info, in an X-Replica header on every response and on every metric, and it starts
    every job and image id, so that requests naming an id can be routed to the replica owning it.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level)
    try:
        device = resolve_device(settings.device)
    except RuntimeError:
        device = resolve_device("cpu")  # the loader explains the problem, then the worker exits
    lifecycle = Lifecycle()
    metrics = ServerMetrics(device, replica)
    restart: RestartPolicy | None = None
    check_output_dir(settings)
    warn_missing_lora_dir(settings)
    # Where finished images are shared with every server (ConfigurationError: boto3 missing, ...).
    objects = open_object_store(settings.results_url) if settings.results_url is not None else None
    if replica is None:  # a replica says so itself (launch/ray_app.py): Ray's proxies listen, not it
        warn_if_open(settings)
    if engine_factory is not None:
        factories = [engine_factory]
        if settings.gpus_per_engine > 1:  # Ray replicas and tests: one engine in this process
            log.warning("QWEN_IMAGE_GPUS_PER_ENGINE=%d applies to engine processes; the engine in this "
                        "process uses one device", settings.gpus_per_engine)
    else:
        gpus = engine_gpus(settings)
        factories = list(engines) if engines is not None else engine_factories(settings, gpus)
        restart = RestartPolicy(settings.engine_restart_backoff_s, attempts=settings.engine_restart_attempts)

    def queue_length() -> int:
        return scheduler.stats().queue_length  # bound just below, before any job can exist

    scheduler = Scheduler(
        [metrics.measure_load(factory) for factory in factories],
        SchedulerConfig.from_settings(settings, device.type),
        on_fatal=lifecycle.engine_failed,
        observer=SchedulerMetrics(metrics, queue_length),
        id_prefix=id_prefix(replica),
        restart=restart,
        watchdog=WatchdogConfig.from_settings(settings),
    )
    metrics.watch_engines(scheduler)
    metrics.watch_output_disk(settings.output_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(settings.threads, thread_name_prefix="qwen-image-cpu")
        results = ResultStore(settings.result_ttl_s, settings.max_stored_results, settings.results_max_bytes,
                              id_prefix=id_prefix(replica))
        generation = Generation(settings, device, scheduler, executor, objects)
        stores = await anyio.to_thread.run_sync(open_stores, settings, objects, replica)
        store = stores.jobs
        jobs = JobRegistry(generation, results, settings.result_ttl_s, settings.max_stored_results,
                           settings.max_subscribers_per_job, store=store, on_end=job_routes.announce_end(app),
                           exchange=stores.exchange)
        secret = (settings.files_secret.get_secret_value().encode("utf-8") if settings.files_secret
                  else await anyio.to_thread.run_sync(load_secret, settings.output_dir))
        files = FileLinks(secret, settings.file_link_ttl_s)
        webhooks = Webhooks(settings, await anyio.to_thread.run_sync(signing_secret, settings, stores.webhook_secret),
                            metrics.webhook_outcome, outbox=stores.outbox)
        images = UrlImages(results, objects, settings.result_ttl_s)
        app.state.ctx = ServerContext(generation, lifecycle, results, jobs, files, webhooks, images, replica=replica)
        await webhooks.start()  # deliveries pending from before a restart resume now
        scheduler.start()
        sweeper: asyncio.Task[None] | None = None
        expiry: asyncio.Task[None] | None = None
        shared_expiry: asyncio.Task[None] | None = None
        try:
            # Jobs accepted before a restart run again, ahead of any new request.
            await jobs.recovery.recover()
            await jobs.recovery.share()  # with a shared store: the lease, the relay, cancels from other servers
            if jobs.store is not None:
                expiry = asyncio.create_task(jobs.store.sweep_periodically(STORE_SWEEP_INTERVAL_S))
            if objects is not None:
                shared_expiry = asyncio.create_task(expire_periodically(objects, STORE_SWEEP_INTERVAL_S))
            # The output folder's upkeep, while the model loads: once before serving (what a crash
            # left, images past the retention limits while the server was down), then periodically.
            await generation.in_pool(generation.output.sweep)
            sweeper = asyncio.create_task(sweep_periodically(
                generation.output, settings.output_sweep_interval_s, generation.in_pool))
            log.info("serving on %s with %d engine%s (model %s loading in the background); batching: %s",
                     device.label, scheduler.engine_count, "s" if scheduler.engine_count > 1 else "",
                     settings.model, scheduler.config)
            yield
        finally:
            for task in (sweeper, expiry, shared_expiry):
                if task is not None:
                    task.cancel()
            # By now the server has answered every in-flight request (or the drain timed out).
            await anyio.to_thread.run_sync(scheduler.shutdown, settings.drain_timeout_s)
            await jobs.settled()  # every job's end is stored and announced before these close
            await jobs.recovery.unshare()  # what is left unfinished is another server's to run now
            await webhooks.stop()
            if store is not None:
                await anyio.to_thread.run_sync(store.close)
            executor.shutdown(wait=True)
            log.info("stopped")

    app = FastAPI(
        title="qwen-image-server",
        version=__version__,
        description="Qwen-Image text-to-image server: the seed API, batching scheduler, and more.",
        lifespan=lifespan,
    )
    app.state.settings = settings  # for the server that runs the app (connection limits)
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.state.metrics = metrics
    app.state.metrics_key = settings.metrics_key
    # The last middleware added runs first, so requests meet them in this order: the replica's
    # name and the metrics (they see every answer, refusals included); the Host allowlist (a
    # request for another name is not for this server at all, and the origin check below trusts
    # the Host it compares with only once this has); the origin check; the API keys; the body
    # limit. Every refusal comes from the headers alone, before a byte of the body is read.
    add_body_limit(app, settings.max_body_bytes, settings.max_upload_bytes)
    keys = settings.accepted_keys
    if keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=keys)
    app.add_middleware(CrossOriginGuard, allowed_origins=settings.allowed_origins)
    if "*" not in settings.allowed_hosts:
        app.add_middleware(HostAllowlist, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(http_metrics.HttpMetricsMiddleware, metrics=metrics)
    if replica:
        app.add_middleware(ReplicaHeaderMiddleware, replica=replica)
    app.include_router(http_metrics.router)
    app.include_router(file_routes.router)
    app.include_router(native_routes.router)
    app.include_router(job_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(lora_routes.router)
    install_web(app)
    return app
