"""Prometheus metrics: HTTP traffic, the scheduler's queue and batches, job outcomes, the model.

One `ServerMetrics` per app (so servers in one test process do not mix their numbers), fed by
the HTTP middleware (`api/http_metrics.py`), the scheduler's observer hook (`SchedulerMetrics`) and
the model loader. `GET /metrics` renders it.

With several Gunicorn workers each process has its own numbers, and a scrape reaches only one
of them. prometheus-client's multiprocess mode solves that: every process writes its values to
files under `PROMETHEUS_MULTIPROC_DIR` and a scrape sums them all (`launch/http.run_gunicorn` makes
a fresh folder when WORKERS > 1; its `child_exit` hook drops dead workers' gauges). The mode is
chosen when prometheus_client is first imported, so the variable must be set before that.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from qwen_image_server import errors
from qwen_image_server.engine.contract import Engine, facts_of
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.types import LoraSet, PreviewMode
from qwen_image_server.job_state import JobEvent
from qwen_image_server.scheduler import Job, Scheduler, SlotState
from qwen_image_server.serving.output_folder import free_bytes
from qwen_image_server.serving.webhooks import Outcome

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# From a 10 ms health check or denoising step to a 10-minute queue wait or big CPU batch.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                   300.0, 600.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# A latent preview takes about a millisecond on a GPU, a full one (a VAE decode) tens of them.
PREVIEW_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Label values created up front, so rate() and alerts see a 0 series rather than none.
_REJECTION_REASONS = (errors.QueueFull.type, errors.ShuttingDown.type)
_FAILURE_TYPES = (errors.InferenceFailed.type, errors.OutOfMemory.type, errors.EngineDead.type,
                  errors.QueueTimeout.type, errors.ShuttingDown.type)
# A job's size and step count as a few classes (upper bounds), so "latency by size and steps" has
# a bounded number of series whatever sizes clients ask for. Megapixels are 2**20 pixels: 1024x1024
# is "1", the model's own 1328x1328 "2".
MEGAPIXEL_CLASSES = (0.25, 0.5, 1.0, 2.0, 4.0)
STEP_CLASSES = (4, 8, 20, 30, 50)


def _class_of(value: float, bounds: Sequence[float]) -> str:
    """The smallest bound `value` fits under, as a label ("+Inf" past the last)."""
    return next((f"{bound:g}" for bound in bounds if value <= bound), "+Inf")


# The `_created` timestamp series would double the exposition; Prometheus does not need them.
disable_created_metrics()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ServerMetrics:
    """Every metric of one server process; `render` gives the exposition for a scrape.

    A replica of a scaled-out deployment (`replica` set) puts `replica="<name>"` on every sample,
    so numbers scraped from different replicas never merge into one series.
    """

    def __init__(self, device: DeviceInfo, replica: str | None = None) -> None:
        self.device = device
        self.replica = replica
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        if self.multiprocess:
            if values.ValueClass is values.MutexValue:
                raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set, "
                                   "so its values would stay in this process; set it earlier")
        else:  # per-process collectors cannot be summed across workers: single-process only
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r = self.registry
        self.http_requests = Counter(
            "qwen_image_http_requests", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=r)
        self.http_latency = Histogram(
            "qwen_image_http_request_duration_seconds",
            "Seconds from request to response start (for streams: to the first byte).",
            ["method", "route"], buckets=SECONDS_BUCKETS, registry=r)
        self.queue_size = Gauge(
            "qwen_image_queue_size", "Jobs waiting in the queue (summed over live workers).",
            multiprocess_mode="livesum", registry=r)
        self.queue_wait = Histogram(
            "qwen_image_queue_wait_seconds", "Seconds a job waited in the queue before its batch started.",
            buckets=SECONDS_BUCKETS, registry=r)
        self.inference = Histogram(
            "qwen_image_batch_inference_seconds", "Seconds of one pipeline call (one batch).",
            buckets=SECONDS_BUCKETS, registry=r)
        self.step = Histogram(
            "qwen_image_denoising_step_seconds",
            "Seconds of one denoising step of a batch (the first step, which also encodes the "
            "prompts, is left out).", buckets=SECONDS_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "qwen_image_batch_size", "Jobs per pipeline call.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.preview = Histogram(
            "qwen_image_preview_seconds",
            "Engine seconds of one live preview, by mode (latent: a projection of the latents; full: "
            "a VAE decode). The job that asked for it waits that long; so does its batch.",
            ["mode"], buckets=PREVIEW_BUCKETS, registry=r)
        self.images = Counter("qwen_image_images_generated", "Images generated and delivered.", registry=r)
        self.job_duration = Histogram(
            "qwen_image_job_duration_seconds",
            "Seconds from a job's submission to its image (queue wait included), by size and steps: "
            "`megapixels` and `steps` are the smallest class bound the job fits under (+Inf past the "
            "last).", ["megapixels", "steps"], buckets=SECONDS_BUCKETS, registry=r)
        self.cancelled = Counter(
            "qwen_image_jobs_cancelled", "Jobs cancelled by their client or a disconnect.", registry=r)
        self.rejected = Counter(
            "qwen_image_jobs_rejected", "Jobs refused at submission (429 queue_full, 503 shutting_down).",
            ["reason"], registry=r)
        self.failed = Counter(
            "qwen_image_jobs_failed", "Jobs that failed, by error type.", ["type"], registry=r)
        self.model_load = Gauge(
            "qwen_image_model_load_seconds", "Seconds the model took to load (one series per live worker).",
            multiprocess_mode="liveall", registry=r)
        self.gpu_allocated = Gauge(
            "qwen_image_gpu_memory_allocated_bytes", "GPU memory held by tensors (0 without CUDA).",
            multiprocess_mode="livesum", registry=r)
        self.gpu_reserved = Gauge(
            "qwen_image_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator (0 without CUDA).",
            multiprocess_mode="livesum", registry=r)
        self.engine_restarts = Counter(
            "qwen_image_engine_restarts", "Engines started again after their process died, by engine.",
            ["engine"], registry=r)
        self.engine_timeouts = Counter(
            "qwen_image_engine_timeouts", "Batches that ran past their deadline, by engine: its engine "
            "was killed (a process) or given up (in this process) as hung.", ["engine"], registry=r)
        self.engine_batches = Counter(
            "qwen_image_engine_batches", "Pipeline calls finished, by engine.", ["engine"], registry=r)
        self.lora_switches = Counter(
            "qwen_image_lora_switches", "Batches whose LoRAs (names and scales) differ from the previous "
            "batch's on the same engine: the engine changed its active adapters.", ["engine"], registry=r)
        self.prompt_cache_hits = Counter(
            "qwen_image_prompt_cache_hits", "Prompts whose embeddings came from the prompt cache, by engine.",
            ["engine"], registry=r)
        self.prompt_cache_misses = Counter(
            "qwen_image_prompt_cache_misses", "Prompts the text encoder ran for, by engine.", ["engine"], registry=r)
        # The counts each engine reported last (an engine's own restart from zero counts afresh).
        self._prompt_counts: dict[int, tuple[int, int]] = {}
        self._prompt_lock = threading.Lock()  # read after each batch and at each scrape
        self.engine_busy = Gauge(
            "qwen_image_engine_busy", "1 while the engine runs a batch.", ["engine", "gpu"],
            multiprocess_mode="livesum", registry=r)
        self.engine_up = Gauge(
            "qwen_image_engine_up", "1 while the engine is loaded and serving.", ["engine", "gpu"],
            multiprocess_mode="livesum", registry=r)
        # Every front on a machine sees the same disk: a scrape shows the freshest reading.
        self.output_disk_free = Gauge(
            "qwen_image_output_disk_free_bytes",
            "Bytes free for the server on the output folder's disk (NaN when unreadable); below "
            "QWEN_IMAGE_MIN_FREE_DISK_MB, /ready is 503 and save_to_file requests get 507.",
            multiprocess_mode="livemostrecent", registry=r)
        self.webhook_deliveries = Counter(
            "qwen_image_webhook_deliveries",
            "Tries of webhook deliveries, by outcome: delivered (a 2xx answer), retried (a failed try, "
            "tried again later), given_up (410 Gone, a host it may not call, or retries ran out).",
            ["outcome"], registry=r)
        self._scheduler: Scheduler | None = None
        self._output_dir: Path | None = None
        for reason in _REJECTION_REASONS:
            self.rejected.labels(reason)
        for type_ in _FAILURE_TYPES:
            self.failed.labels(type_)
        for mode in get_args(PreviewMode):
            self.preview.labels(mode)
        for outcome in get_args(Outcome):
            self.webhook_deliveries.labels(outcome)

    # -- feeding ----------------------------------------------------------------------------

    def webhook_outcome(self, outcome: Outcome) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "OTHER"  # free-form methods: bounded labels
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route).observe(seconds)

    def measure_load(self, load: Callable[[], Engine]) -> Callable[[], Engine]:
        """`load` (the scheduler's engine factory) recording the model's load time."""

        def load_and_record() -> Engine:
            engine = load()
            model = facts_of(engine).model  # test engines have none
            if model is not None:
                self.model_load.set(model.load_time)
            self.update_gpu_memory()
            return engine

        return load_and_record

    def watch_engines(self, scheduler: Scheduler) -> None:
        """Read every engine's state (busy, up) and memory from `scheduler` at each scrape."""
        self._scheduler = scheduler
        for slot in scheduler.stats().engines:
            self.engine_restarts.labels(str(slot.index))
            self.engine_timeouts.labels(str(slot.index))
            self.engine_batches.labels(str(slot.index))
            self.lora_switches.labels(str(slot.index))

    def watch_output_disk(self, folder: Path) -> None:
        """Read the free space of `folder`'s disk at each scrape."""
        self._output_dir = folder

    def update_output_disk(self) -> None:
        if self._output_dir is None:
            return
        free = free_bytes(self._output_dir)
        self.output_disk_free.set(float("nan") if free is None else free)

    def update_engines(self) -> None:
        if self._scheduler is None:
            return
        for slot in self._scheduler.stats().engines:
            labels = (str(slot.index), "" if slot.gpu is None else str(slot.gpu))
            self.engine_busy.labels(*labels).set(1 if slot.state is SlotState.BUSY else 0)
            self.engine_up.labels(*labels).set(1 if slot.state.serving else 0)

    def update_prompt_cache(self) -> None:
        """Add what each engine's prompt cache counted since the last reading."""
        if self._scheduler is None:
            return
        with self._prompt_lock:
            for slot in self._scheduler.stats().engines:
                if slot.prompt_cache is not None:
                    self._count_prompts(slot.index, slot.prompt_cache.hits, slot.prompt_cache.misses)

    def _count_prompts(self, index: int, hits: int, misses: int) -> None:
        before = self._prompt_counts.get(index, (0, 0))
        if hits < before[0] or misses < before[1]:  # a restarted engine counts from zero
            before = (0, 0)
        self.prompt_cache_hits.labels(str(index)).inc(hits - before[0])
        self.prompt_cache_misses.labels(str(index)).inc(misses - before[1])
        self._prompt_counts[index] = (hits, misses)

    def update_gpu_memory(self) -> None:
        if self.device.type != "cuda":
            return
        reports = engine_memory(self._scheduler) if self._scheduler is not None else None
        if reports is not None:  # engine processes: what they reported after their last batch
            self.gpu_allocated.set(sum(m["allocated"] for m in reports) * 2**20)
            self.gpu_reserved.set(sum(m["reserved"] for m in reports) * 2**20)
            return
        import torch

        try:
            self.gpu_allocated.set(torch.cuda.memory_allocated())
            self.gpu_reserved.set(torch.cuda.memory_reserved())
        except RuntimeError:  # a failed device: the engine reports it; keep the last values
            log.debug("could not read GPU memory", exc_info=True)

    # -- scraping ---------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if asked) and its content type."""
        self.update_gpu_memory()
        self.update_engines()
        self.update_prompt_cache()
        self.update_output_disk()
        registry = self.registry
        if self.multiprocess:
            # Read afresh on every scrape: the files of every worker, live or gone.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        if self.replica is not None:
            labelled = CollectorRegistry(auto_describe=False)
            labelled.register(_Labelled(registry, {"replica": self.replica}))
            registry = labelled
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


class _Labelled(Collector):
    """Another registry's metrics, with `labels` added to every sample."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s._replace(labels={**s.labels, **self._labels}) for s in metric.samples]
            yield metric


class SchedulerMetrics:
    """The scheduler's observer (`scheduler.SchedulerObserver`): queue, batches, steps, outcomes."""

    def __init__(self, metrics: ServerMetrics, queue_length: Callable[[], int]) -> None:
        self.m = metrics
        self._queue_length = queue_length
        # (batch id, last step seen, when): steps run on the one engine thread, one batch at a time.
        self._step_mark: tuple[int | None, int, float] = (None, 0, 0.0)
        self._engine_loras: dict[int, LoraSet] = {}  # each engine's last batch's LoRAs

    def job_event(self, job: Job, event: JobEvent) -> None:
        if event in (JobEvent.QUEUED, JobEvent.STARTED, JobEvent.CANCELLED, JobEvent.FAILED):
            # Read the true length rather than counting moves: no event sequence can skew it.
            self.m.queue_size.set(self._queue_length())
        if event is JobEvent.STARTED:
            if job.started_at is not None:
                self.m.queue_wait.observe(job.started_at - job.submitted_at)
            self._step_mark = (job.batch_id, 0, time.perf_counter())
        elif event is JobEvent.STEP:
            self._step(job)
        elif event is JobEvent.PREVIEW:
            if job.preview is not None:
                self.m.preview.labels(job.preview.mode).observe(job.preview.seconds)
        elif event is JobEvent.SUCCEEDED:
            self.m.images.inc()
            if job.finished_at is not None:
                spec = job.spec
                self.m.job_duration.labels(
                    _class_of(spec.pixels / 2**20, MEGAPIXEL_CLASSES),
                    _class_of(spec.num_inference_steps, STEP_CLASSES),
                ).observe(job.finished_at - job.submitted_at)
        elif event is JobEvent.CANCELLED:
            self.m.cancelled.inc()
        elif event is JobEvent.FAILED:
            error = job.future.exception(timeout=0)
            self.m.failed.labels(getattr(error, "type", errors.ServerError.type)).inc()

    def _step(self, job: Job) -> None:
        now = time.perf_counter()
        batch_id, last_step, last_time = self._step_mark
        if job.batch_id != batch_id or job.step < last_step:  # a new run (e.g. an OOM retry)
            self._step_mark = (job.batch_id, job.step, now)
            return
        if job.step == last_step:  # the same step, reported for another job of the batch
            return
        if last_step >= 1:  # the first step's time also holds the prompt encoding
            self.m.step.observe(now - last_time)
        self._step_mark = (batch_id, job.step, now)

    def batch_finished(self, batch: Sequence[Job], seconds: float) -> None:
        engine = batch[0].engine or 0
        self.m.engine_batches.labels(str(engine)).inc()
        loras = batch[0].spec.loras  # one batch, one set of LoRAs (they are in its batch key)
        if loras != self._engine_loras.get(engine, ()):
            self.m.lora_switches.labels(str(engine)).inc()
        self._engine_loras[engine] = loras
        self.m.inference.observe(seconds)
        self.m.batch_size.observe(len(batch))
        self.m.update_gpu_memory()
        self.m.update_prompt_cache()

    def rejected(self, error: errors.ServerError) -> None:
        self.m.rejected.labels(error.type).inc()

    def engine_restarted(self, slot: int) -> None:
        self.m.engine_restarts.labels(str(slot)).inc()

    def engine_hung(self, slot: int) -> None:
        self.m.engine_timeouts.labels(str(slot)).inc()


def engine_memory(scheduler: Scheduler) -> list[dict[str, float]] | None:
    """The GPU memory engine processes reported (None for an engine in this process, whose
    memory is read directly)."""
    facts = [facts_of(engine) for engine in scheduler.engines]
    if not facts or any(f.in_process for f in facts):
        return None
    return [f.memory for f in facts if f.memory]
