"""Running the app as a process: graceful drain on SIGTERM/Ctrl+C, uvicorn and Gunicorn runners, the
Gunicorn worker class.

The process model: Gunicorn's one worker is the front (HTTP, validation, the queue, every job's
state, /metrics); it starts WORKERS engine processes (`engine/process.py`) and restarts any that
dies. Gunicorn's arbiter restarts the front itself if it dies (its engines exit with it).

Uvicorn closes its listening socket as soon as SIGTERM arrives. A server that drains should
instead keep answering (new jobs get 503 `shutting_down`, `/ready` turns 503 so load balancers
stop sending) while queued and running jobs finish, and only then close. `GracefulServer` does
that: the first signal starts the drain, the server exits when the scheduler is idle or
`drain_timeout_s` has passed; a second Ctrl+C forces the exit as usual.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI

from qwen_image_server.config.settings import Settings
from qwen_image_server.launch.connection_limits import bound_connections, raise_open_file_limit
from qwen_image_server.serving.lifecycle import Lifecycle

if TYPE_CHECKING:
    from qwen_image_server.api.context import ServerContext

log = logging.getLogger(__name__)


def find_fastapi(app: Any) -> FastAPI | None:
    """The FastAPI app inside uvicorn's middleware wrappers."""
    while app is not None and not isinstance(app, FastAPI):
        app = getattr(app, "app", None)
    return app


def app_settings(app: Any) -> Settings:
    """The settings the app was built with (`create_app` keeps them), else those of the environment."""
    fastapi_app = find_fastapi(app)
    settings = getattr(fastapi_app.state, "settings", None) if fastapi_app is not None else None
    return settings if isinstance(settings, Settings) else Settings()


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the scheduler before closing."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drain_started_at: float | None = None

    def _app(self) -> FastAPI | None:
        return find_fastapi(getattr(self.config, "loaded_app", None))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self._app()
        lifecycle: Lifecycle | None = getattr(app.state, "lifecycle", None) if app else None
        if lifecycle is None:
            super().handle_exit(sig, frame)
            return
        if lifecycle.drain_requested:
            # Already draining: a second Ctrl+C forces the exit; a SIGTERM from Gunicorn's
            # arbiter (which relays the Ctrl+C we already got) must not cut the drain short.
            if sig == signal.SIGINT:
                super().handle_exit(sig, frame)
            return
        # Only set a flag here: this runs inside a signal handler; on_tick does the work.
        lifecycle.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        app = self._app()
        if app is None or not hasattr(app.state, "ctx"):
            return False
        ctx: ServerContext = app.state.ctx
        if ctx.lifecycle.exit_requested:
            return True
        if not ctx.lifecycle.drain_requested:
            return False
        scheduler = ctx.scheduler
        if self._drain_started_at is None:
            self._drain_started_at = time.monotonic()
            stats = scheduler.stats()
            log.info("draining: %d queued, %d running; new jobs get 503 (up to %.0fs)",
                     stats.queue_length, stats.running_batch_size, ctx.settings.drain_timeout_s)
            scheduler.begin_drain()
        if scheduler.wait_idle(timeout=0):
            log.info("drained; shutting down")
            return True
        if time.monotonic() - self._drain_started_at >= ctx.settings.drain_timeout_s:
            log.warning("drain timeout reached; failing the jobs that are left")
            scheduler.stop()  # their requests get 503 shutting_down before the server closes
            return True
        return False

    def exit_code(self) -> int:
        app = self._app()
        lifecycle: Lifecycle | None = getattr(app.state, "lifecycle", None) if app else None
        return lifecycle.exit_code if lifecycle else 0


def run_uvicorn(settings: Settings) -> int:
    """Serve in this process with GracefulServer (Windows, or WORKERS=1 without Gunicorn)."""
    # Imported when called: the CLI checks its settings, and Gunicorn's arbiter reads
    # gunicorn_options, before the app and the libraries it needs are imported.
    from qwen_image_server.api.app import create_app

    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level, workers=1)
    raise_open_file_limit()
    bound_connections(config, settings)
    server = GracefulServer(config)
    server.run()
    return server.exit_code()


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """Gunicorn settings derived from ours: used by `qwen-image serve` and gunicorn_config.py."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        # One front for the machine: it owns the queue and every job; WORKERS counts its engines.
        "workers": 1,
        "worker_class": "qwen_image_server.launch.http.QwenImageWorker",
        # A batch of big images can take minutes on small GPUs; the worker's heartbeat runs on
        # the event loop, which never waits for the model, so this only catches real hangs.
        "timeout": 300,
        # Gunicorn kills workers that outlive this after SIGTERM: give the drain its time.
        "graceful_timeout": math.ceil(settings.drain_timeout_s) + 15,
        "loglevel": settings.log_level,
        "accesslog": "-",
        "errorlog": "-",
        # Gunicorn >= 25 opens a control socket at one fixed path per user, which a second
        # server on the same machine would fight over; nothing here uses it.
        "control_socket_disable": True,
        "child_exit": child_exit,
    }


# Not imported from qwen_image_server.serving.metrics: that imports prometheus_client, which picks its
# multiprocess mode once, at import, from this variable; so it must be set before.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def child_exit(server: Any, worker: Any) -> None:
    """Gunicorn hook (in the arbiter): a dead worker's live gauges leave /metrics."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def run_gunicorn(settings: Settings) -> int:
    """Serve with Gunicorn: one worker, the front, which starts the WORKERS engine processes."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    from qwen_image_server.api.app import create_app

    class DrainingArbiter(Arbiter):
        def handle_int(self) -> None:
            # Ctrl+C drains like SIGTERM (the seed's documented way to stop the server).
            self.handle_term()

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                if key in self.cfg.settings:  # older Gunicorns lack some options
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(settings)  # in each worker, after the fork

        def run(self) -> None:
            DrainingArbiter(self).run()

    Application().run()
    return 0


try:  # Gunicorn and its uvicorn worker exist on POSIX only (Windows runs run_uvicorn).
    from gunicorn.arbiter import Arbiter as _Arbiter
    from uvicorn_worker import UvicornWorker
except ImportError:  # pragma: no cover - Windows
    UvicornWorker = None

if UvicornWorker is not None:

    class QwenImageWorker(UvicornWorker):
        """Gunicorn worker serving through GracefulServer and exiting with the app's exit code."""

        async def _serve(self) -> None:
            self.config.app = self.wsgi
            raise_open_file_limit()
            bound_connections(self.config, app_settings(self.wsgi))
            server = GracefulServer(config=self.config)
            self._install_sigquit_handler()
            await server.serve(sockets=self.sockets)
            if not server.started:
                sys.exit(_Arbiter.WORKER_BOOT_ERROR)
            if server.exit_code():
                sys.exit(server.exit_code())
