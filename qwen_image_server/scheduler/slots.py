"""Engine slots: one engine and the thread that feeds it, loaded, watched and restarted.

Each slot's thread loads its engine, then takes batches from the scheduler whenever the engine is
idle and runs them. Without a restart policy (one engine in this process) a failed load or a
failed device ends the scheduler. With one (engine processes) a slot whose engine failed starts a
new one, after a backoff that doubles with each failure in a row; a slot whose engine fails to
load `attempts` times in a row is given up, and the scheduler dies only when every slot is. An
engine whose batch ran past its deadline (`watchdog.py`) is killed, and fails as a dead one does.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from qwen_image_server import errors
from qwen_image_server.engine.contract import Engine, RankFacts, Supervised, facts_of
from qwen_image_server.engine.prompt_cache import PromptCacheStats
from qwen_image_server.scheduler.jobs import Job
from qwen_image_server.scheduler.watchdog import BatchWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How slots whose engine failed come back: after `backoff_s`, doubled for each failure in a
    row (up to `max_backoff_s`); a slot whose engine failed to load `attempts` times in a row is
    given up."""

    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    attempts: int = 5

    def delay(self, streak: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, streak - 1))


class SlotState(str, Enum):
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    FAILED = "failed"  # given up: its engine could not be restarted
    STOPPED = "stopped"

    @property
    def serving(self) -> bool:
        """Its engine is loaded and runs batches, or is ready to."""
        return self in (SlotState.IDLE, SlotState.BUSY)


class EngineLoss(Enum):
    """How a slot lost its engine, which decides the backoff before the next one."""

    AFTER_WORK = "after work"  # it had finished a batch first: a fresh failure, the shortest wait
    AT_ONCE = "at once"  # before any batch: one more failure in a row, a longer wait


@dataclass(eq=False)
class EngineSlot:
    """One engine and the thread that feeds it. Mutated only under the scheduler's lock."""

    index: int
    factory: Callable[[], Engine]
    engine: Engine | None = None
    state: SlotState = SlotState.LOADING
    running: list[Job] = field(default_factory=list)
    batches: int = 0
    restarts: int = 0
    lost: bool = False  # its engine process ended while the slot was idle, or is being killed
    thread: threading.Thread | None = None
    watch: BatchWatch | None = None  # the running batch's deadline (None: none, or no watchdog)
    rate: float | None = None  # the slowest seconds per step per megapixel seen here (any engine)
    warm: bool = False  # a batch ended here with `rate` known: no warm-up allowance any more
    loras_run: set[str] = field(default_factory=set)  # LoRAs its engine has run (they are loaded)
    hung: bool = False  # its engine was killed past a batch deadline (until a new one serves)

    @property
    def restart_cause(self) -> str | None:
        """Why it is restarting its engine, in a few words (None unless restarting)."""
        if self.state is not SlotState.RESTARTING:
            return None
        return "a hung batch" if self.hung else "an engine crash"

    def stats_locked(self) -> SlotStats:
        """Its numbers for /info and /metrics (the scheduler's lock held)."""
        facts = facts_of(self.engine)
        return SlotStats(index=self.index, state=self.state, gpu=facts.gpu, pid=facts.pid,
                         running_batch_size=len(self.running), batches=self.batches,
                         restarts=self.restarts, memory=facts.memory, prompt_cache=facts.prompt_cache,
                         ranks=facts.ranks, parallel=facts.parallel,
                         batch_deadline_s=None if self.watch is None else self.watch.allowance_s)


@dataclass(frozen=True, slots=True)
class SlotStats:
    index: int
    state: SlotState
    gpu: int | None  # the GPU its engine runs on (None on the CPU or in this process)
    pid: int | None  # the engine's process, when it has its own
    running_batch_size: int
    batches: int
    restarts: int
    memory: dict[str, float] | None = None  # GPU memory an engine process reported last
    batch_deadline_s: float | None = None  # seconds its running batch may take (None: none, or no watchdog)
    prompt_cache: PromptCacheStats | None = None  # its prompt caches' counts (None: it has none)
    ranks: tuple[RankFacts, ...] = ()  # its ranks, when it splits images over several GPUs
    parallel: str | None = None


class SlotSupervisor:
    """Serves every slot of one scheduler: its thread's whole life, from the first load to the
    last close. The scheduler lends it its lock and the few things only it knows."""

    def __init__(
        self,
        slots: list[EngineSlot],
        lock: threading.Condition,
        restart: RestartPolicy | None,
        clock: Callable[[], float],
        *,
        ended: Callable[[], bool],
        take_batch: Callable[[EngineSlot], list[Job] | None],
        execute: Callable[[EngineSlot, Engine, list[Job]], bool],
        die: Callable[[BaseException, errors.ServerError], None],
        restarted: Callable[[EngineSlot], None],
    ) -> None:
        self._slots = slots
        self._lock = lock
        self._restart = restart
        self._clock = clock
        self._ended = ended  # the scheduler stopped or died: no slot starts anything new
        self._take_batch = take_batch  # the slot's next batch, started; None when the slot should stop
        self._execute = execute  # run a batch; False when the engine failed under it
        self._die = die
        self._restarted = restarted

    def serve(self, slot: EngineSlot) -> None:
        """The slot's thread: load its engine and run batches on it; with a restart policy, start
        a new engine whenever it fails, until the scheduler stops or the slot is given up."""
        streak = 0  # failures in a row: loads that failed, engines lost before finishing a batch
        try:
            while True:
                try:
                    engine = slot.factory()
                except BaseException as exc:  # noqa: BLE001 - any load failure ends this engine
                    if self._restart is None or slot.restarts == 0:
                        # A model that cannot load at all needs a person, not a restart loop.
                        self._die(exc, errors.EngineDead("The model failed to load."))
                        return
                    streak += 1
                    log.error("engine %d failed to load again (%d in a row): %s", slot.index, streak, exc)
                    if streak >= self._restart.attempts:
                        self._give_up(slot, exc)
                        return
                    if not self._pause(self._restart.delay(streak)):
                        return
                    continue
                with self._lock:
                    ended = self._ended()
                    if not ended:
                        slot.engine, slot.lost, slot.state = engine, False, SlotState.IDLE
                        slot.hung, slot.loras_run = False, set()
                        self._lock.notify_all()
                if ended:
                    close(engine)
                    return
                if isinstance(engine, Supervised):
                    engine.on_exit(functools.partial(self.engine_exited, slot, engine))
                loss = self._run(slot, engine)
                if loss is None:
                    return
                streak = 1 if loss is EngineLoss.AFTER_WORK else streak + 1
                assert self._restart is not None
                with self._lock:
                    slot.engine, slot.state = None, SlotState.RESTARTING
                    slot.restarts += 1
                    self._lock.notify_all()
                close(engine)
                self._restarted(slot)
                delay = self._restart.delay(streak)
                log.warning("restarting engine %d (restart %d) in %.1fs", slot.index, slot.restarts, delay)
                if not self._pause(delay):
                    return
        finally:
            with self._lock:
                if slot.state is not SlotState.FAILED:
                    slot.state = SlotState.STOPPED
                engine_left, slot.engine = slot.engine, None
                self._lock.notify_all()
            if engine_left is not None:
                close(engine_left)

    def engine_exited(self, slot: EngineSlot, engine: Engine) -> None:
        """An engine process ended: an idle slot hears it at once (a busy one from run_batch)."""
        with self._lock:
            if slot.engine is engine:
                slot.lost = True
                self._lock.notify_all()

    def _run(self, slot: EngineSlot, engine: Engine) -> EngineLoss | None:
        """Run batches until the scheduler stops (None) or the engine is lost."""
        loss = EngineLoss.AT_ONCE
        while True:
            batch = self._take_batch(slot)
            if batch is None:
                if slot.lost and self._restart is not None and not self._ended():
                    if not slot.hung:  # a hung one was killed: the watchdog said so
                        log.error("engine %d ended while idle", slot.index)
                    return loss
                return None
            if not self._execute(slot, engine, batch):
                return None if self._ended() else loss
            loss = EngineLoss.AFTER_WORK

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds` unless the scheduler stops meanwhile (then False)."""
        deadline = self._clock() + seconds
        with self._lock:
            while not self._ended():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return True
                self._lock.wait(remaining)
        return False

    def _give_up(self, slot: EngineSlot, exc: BaseException) -> None:
        with self._lock:
            slot.state = SlotState.FAILED
            others = any(s.state is not SlotState.FAILED for s in self._slots)
            self._lock.notify_all()
        log.critical("engine %d could not be restarted; giving it up: %s", slot.index, exc)
        if not others:
            self._die(exc, errors.EngineDead("No engine could be restarted."))


def killable(engine: Engine) -> bool:
    """The engine has a process of its own: it can be killed, even in the middle of a batch."""
    return isinstance(engine, Supervised)


def kill(engine: Engine) -> None:
    """Kill a `killable` engine at once (its running batch fails with EngineLost)."""
    assert isinstance(engine, Supervised)
    try:
        engine.kill()
    except Exception:  # already gone: its batch fails with EngineLost all the same
        log.exception("killing engine failed")


def close(engine: Engine) -> None:
    """Close an engine that has a process of its own (others need nothing)."""
    if isinstance(engine, Supervised):
        try:
            engine.close()
        except Exception:  # a failed close must not stop the others
            log.exception("closing an engine failed")
