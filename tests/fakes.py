"""A fake engine for fast, deterministic scheduler tests (no model, no torch).

Each step of a batch waits for a permit from the test, so a test decides exactly when a batch
is "running" and when it moves on; the images are solid colours derived from the seed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from qwen_image_server.engine.types import GenerationSpec, StepEvent

if TYPE_CHECKING:
    from qwen_image_server.scheduler import Job, Scheduler

WAIT = 5.0  # seconds a fake-engine test waits for anything: nothing real runs, so it never should


def result_of(job: Job) -> Any:
    return job.future.result(timeout=WAIT)


def stop_all(schedulers: Iterable[Scheduler]) -> None:
    for scheduler in schedulers:
        scheduler.stop()
        scheduler.join(WAIT)


class FakeEngine:
    def __init__(self, *, held: bool = False, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds  # simulated work per step, for tests of measured times
        self.batches: list[list[int]] = []  # seeds of every batch the engine was asked to run
        self.finished: list[list[int]] = []  # seeds of the batches that ran to the end
        self.faults: deque[BaseException] = deque()  # raised by the next batches, in order
        self.oom_above: int | None = None  # batches larger than this raise out-of-memory
        self.freed = 0
        self._started = threading.Semaphore(0)
        self._permits = threading.Semaphore(0)
        self._killed = threading.Event()  # see ProcessLikeEngine.kill
        self._free_running = threading.Event()
        if not held:
            self._free_running.set()

    # -- test controls ----------------------------------------------------------------------

    def wait_started(self, timeout: float = 5.0) -> None:
        """Block until the engine has begun one more batch."""
        assert self._started.acquire(timeout=timeout), "no batch started"

    def allow_steps(self, n: int) -> None:
        for _ in range(n):
            self._permits.release()

    def run_freely(self) -> None:
        self._free_running.set()
        self.allow_steps(1000)

    # -- Engine protocol --------------------------------------------------------------------

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: Callable[[StepEvent], None]) -> list[Image.Image]:
        from qwen_image_server.engine.types import DeviceOutOfMemory, EngineLost

        self.batches.append([s.seed for s in specs])
        self._started.release()
        if self.oom_above is not None and len(specs) > self.oom_above:
            raise DeviceOutOfMemory("fake: out of memory")
        total = specs[0].num_inference_steps
        for step in range(1, total + 1):
            if not self._free_running.is_set():
                assert self._permits.acquire(timeout=10), "test never allowed the step"
            if self._killed.is_set():
                raise EngineLost("fake: the engine's process was killed")
            time.sleep(self.step_seconds)
            on_step(StepEvent(step, total))
        if self.faults:
            raise self.faults.popleft()
        self.finished.append([s.seed for s in specs])
        return [Image.new("RGB", (s.width, s.height), (s.seed % 256, 0, 0)) for s in specs]

    def free_memory(self) -> None:
        self.freed += 1


class ProcessLikeEngine(FakeEngine):
    """A fake engine as an engine process is to the scheduler (`Supervised`): it can be watched,
    closed and killed. Killed, its running batch raises EngineLost at its waiting step, and the
    exit hooks run, as an engine process's would."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exit_hooks: list[Callable[[], None]] = []
        self.kills = 0
        self.closed = False

    def on_exit(self, callback: Callable[[], None]) -> None:
        self.exit_hooks.append(callback)

    def close(self) -> None:
        self.closed = True

    def kill(self) -> None:
        self.kills += 1
        self._killed.set()
        self._permits.release()  # wake the step that waits
        for hook in self.exit_hooks:
            hook()

    def exit(self) -> None:
        """The process ends by itself (nothing running)."""
        for hook in self.exit_hooks:
            hook()
