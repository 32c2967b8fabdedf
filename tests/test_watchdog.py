"""The batch watchdog with fake engines (step permits, and a clock the test moves): each batch's
deadline from its steps, size and the slowest step timed on its slot, a hung engine killed and its
batch retried once, a job that hangs twice failing alone, and an engine in this process that
cannot be killed ending the scheduler."""

from __future__ import annotations

import threading

import pytest

from qwen_image_server import errors
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.scheduler import RestartPolicy, Scheduler, SchedulerConfig, WatchdogConfig
from qwen_image_server.scheduler.watchdog import BatchHung
from tests.conftest import wait_until
from tests.fakes import WAIT, FakeEngine, ProcessLikeEngine, result_of, stop_all


def spec(seed: int, size: int = 512, steps: int = 3, loras: tuple[tuple[str, float], ...] = ()) -> GenerationSpec:
    return GenerationSpec(f"prompt {seed}", " ", size, size, steps, 4.0, seed, loras=loras)


class FakeClock:
    """The scheduler's clock, moved only by the test: step times are exactly what it says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Engines:
    """Each load of the one slot makes a new held ProcessLikeEngine; loads after the first wait
    while `reload_gate` is clear, so a test sees the slot restarting."""

    def __init__(self) -> None:
        self.made: list[ProcessLikeEngine] = []
        self.reload_gate = threading.Event()
        self.reload_gate.set()
        self._cond = threading.Condition()

    def load(self) -> ProcessLikeEngine:
        if self.made:
            assert self.reload_gate.wait(WAIT), "the test never let the engine load again"
        engine = ProcessLikeEngine(held=True)
        with self._cond:
            self.made.append(engine)
            self._cond.notify_all()
        return engine

    def wait_made(self, count: int) -> ProcessLikeEngine:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.made) >= count, WAIT), f"no engine #{count}"
            return self.made[count - 1]


class Hangs:
    """A SchedulerObserver that counts hung batches, by slot."""

    def __init__(self) -> None:
        self.slots: list[int] = []

    def job_event(self, job, event) -> None:
        pass

    def batch_finished(self, batch, seconds: float) -> None:
        pass

    def rejected(self, error) -> None:
        pass

    def engine_restarted(self, slot: int) -> None:
        pass

    def engine_hung(self, slot: int) -> None:
        self.slots.append(slot)


def deadline_s(s: Scheduler) -> float | None:
    return s.stats().engines[0].batch_deadline_s


def wait_step(job, step: int) -> None:
    wait_until(lambda: job.step >= step, WAIT, f"step {step} of job {job.request_id}")


@pytest.fixture
def schedulers() -> list[Scheduler]:
    made: list[Scheduler] = []
    yield made
    stop_all(made)


def test_the_deadline_comes_from_steps_size_and_the_slowest_step_timed(schedulers):
    clock, engines, hangs = FakeClock(), Engines(), Hangs()
    watchdog = WatchdogConfig(floor_s=10.0, factor=2.0, warmup_s=1000.0, lora_s=500.0)
    s = Scheduler(engines.load, SchedulerConfig(max_batch_size=1), clock=clock, observer=hangs,
                  restart=RestartPolicy(backoff_s=0.0), watchdog=watchdog)
    schedulers.append(s)
    s.start()
    first = engines.wait_made(1)

    # Nothing timed yet: the first batch (compiling, say) gets the warm-up allowance.
    job = s.submit(spec(1, size=512, steps=4), 1)
    first.wait_started()
    assert deadline_s(s) == 1000.0
    clock.advance(50.0)  # the first step is not timed: it also loads LoRAs and encodes prompts
    first.allow_steps(2)
    wait_step(job, 2)
    clock.advance(1.0)  # step 3 takes 1 s at 512x512
    first.allow_steps(1)
    wait_step(job, 3)
    assert deadline_s(s) == 1000.0  # still warming up: the first 50 s count against nothing else
    first.allow_steps(1)
    result_of(job)

    # Timed: floor + factor * steps * megapixels * (1 s per step per 512x512 megapixels).
    # Four times the pixels, four steps: 10 + 2 * 4 * 4 s.
    big = s.submit(spec(2, size=1024, steps=4), 2)
    first.wait_started()
    assert deadline_s(s) == pytest.approx(42.0)
    # It hangs: nothing happens for longer than that.
    clock.advance(42.5)
    woken = s.submit(spec(3), 3)  # any change of the scheduler's state wakes its deadline thread
    second = engines.wait_made(2)
    assert first.kills == 1 and hangs.slots == [0]
    # Retried on the fresh engine (the slot's rate is kept: the same model on the same device).
    second.wait_started()
    assert big.crashes == 1 and deadline_s(s) == pytest.approx(42.0)
    second.allow_steps(4)
    second.wait_started()
    second.allow_steps(3)
    assert result_of(big).engine == 0 and result_of(woken).engine == 0
    assert s.stats().engines[0].restarts == 1 and s.trouble is None

    # A LoRA the engine has not run yet may have to be fetched first: more time, the first time.
    for allowance in (10.0 + 2.0 * 3 + 500.0, 10.0 + 2.0 * 3):
        with_lora = s.submit(spec(4, loras=(("style", 1.0),)), 4)
        second.wait_started()
        assert deadline_s(s) == pytest.approx(allowance)
        second.allow_steps(3)
        result_of(with_lora)


def test_a_hung_engine_process_is_killed_and_a_job_that_hangs_twice_fails_alone(schedulers):
    engines, hangs = Engines(), Hangs()
    s = Scheduler(engines.load, SchedulerConfig(max_batch_size=2), observer=hangs,
                  restart=RestartPolicy(backoff_s=0.01, max_backoff_s=0.05), watchdog=WatchdogConfig(timeout_s=1.0))
    schedulers.append(s)
    s.start()
    first = engines.wait_made(1)
    engines.reload_gate.clear()
    poison, innocent = s.submit_many([spec(0), spec(1)], 0)  # one batch of two
    first.wait_started()
    assert s.stats().engines[0].batch_deadline_s == 1.0
    # Its steps never come: past 1 s the engine is killed and the slot restarts it.
    assert s.wait_until(lambda: first.kills == 1, WAIT), "the hung engine was not killed"
    assert s.wait_until(lambda: s.trouble is not None, WAIT)
    assert s.trouble == "engine restarting after a hung batch" and not s.ready and not s.dead
    engines.reload_gate.set()
    second = engines.wait_made(2)
    second.wait_started()  # the batch's jobs run again, each alone: the poison one first
    assert second.batches == [[0]]
    # It hangs again: killed again, and it fails; its batch-mate runs on the next engine.
    third = engines.wait_made(3)
    third.run_freely()
    failure = poison.future.exception(timeout=WAIT)
    assert isinstance(failure, errors.EngineTimeout)
    assert (failure.status_code, failure.type, failure.code) == (500, "inference_error", "engine_timeout")
    assert "hanging past its 1.0 s deadline" in failure.message
    assert result_of(innocent).engine == 0 and innocent.crashes == 1
    assert result_of(s.submit(spec(2), 2)).image.size == (512, 512)  # the next request succeeds
    assert second.kills == 1 and hangs.slots == [0, 0] and s.stats().engines[0].restarts == 2
    assert s.ready and s.trouble is None


def test_an_engine_in_this_process_that_hangs_ends_the_scheduler(schedulers):
    engine = FakeEngine(held=True)  # cannot be killed
    fatal: list[BaseException] = []
    s = Scheduler(lambda: engine, SchedulerConfig(max_batch_size=1), on_fatal=fatal.append,
                  watchdog=WatchdogConfig(timeout_s=0.3))
    schedulers.append(s)
    s.start()
    hung = s.submit(spec(0), 0)
    engine.wait_started()
    queued = s.submit(spec(1), 1)
    failure = hung.future.exception(timeout=WAIT)
    assert isinstance(failure, errors.EngineDead)
    assert (failure.status_code, failure.code) == (503, "engine_timeout")
    assert isinstance(queued.future.exception(timeout=WAIT), errors.EngineDead)
    assert s.dead and not s.ready and isinstance(fatal[0], BatchHung)
    assert s.trouble == "engine failed: a batch hung past its deadline"
    # Should the call come back after all, nothing is answered twice and nothing waits for it.
    engine.run_freely()
    assert s.wait_idle(WAIT)
    assert s.stats().failed == 2 and s.stats().processed == 0


def test_without_a_watchdog_a_slow_batch_is_left_alone(schedulers):
    engine = ProcessLikeEngine(held=True)
    s = Scheduler(lambda: engine, SchedulerConfig(), restart=RestartPolicy())
    schedulers.append(s)
    s.start()
    job = s.submit(spec(0), 0)
    engine.wait_started()
    assert s.stats().engines[0].batch_deadline_s is None
    engine.run_freely()
    assert result_of(job) and engine.kills == 0
