"""What the server process should do next, and the exit codes it hands its process manager.

The routes and the scheduler's `on_fatal` write it; the process runners (`launch/http.py`) read it
on every tick. It lives below the API, so the routes need not import the runners that import them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_image_server.engine.types import DeviceFailure

# Exit codes the serving layer hands to its process manager.
EXIT_LOAD_FAILED = 3  # Gunicorn's "worker failed to boot": it stops instead of respawning forever
EXIT_ENGINE_DEAD = 1  # any other exit: Gunicorn (or the orchestrator) starts a fresh worker


@dataclass
class Lifecycle:
    """What the server process should do next; read by the serving layer on every tick."""

    drain_requested: bool = False
    exit_requested: bool = False
    exit_code: int = 0

    def fail(self, exit_code: int) -> None:
        """Ask the server to exit with `exit_code` as soon as in-flight responses are sent."""
        self.exit_code = exit_code
        self.exit_requested = True

    def engine_failed(self, exc: BaseException) -> None:
        """The scheduler's `on_fatal` (no engine left to serve): a dead device needs a fresh
        process (the process manager starts one); a model that cannot load needs a person (it
        must not respawn forever)."""
        self.fail(EXIT_ENGINE_DEAD if isinstance(exc, DeviceFailure) else EXIT_LOAD_FAILED)
