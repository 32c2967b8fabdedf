"""One queue, several engines (fake ones, with step permits): dispatch to the first idle engine,
the fairness bound across engines, and supervision: a failed engine's batch retried elsewhere, a
job that fails two engines failing alone, restarts with backoff, an engine given up."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pytest

from qwen_image_server import errors
from qwen_image_server.engine.types import EngineLost
from qwen_image_server.scheduler import RestartPolicy, Scheduler, SchedulerConfig, SlotState
from tests.fakes import WAIT, FakeEngine, ProcessLikeEngine, result_of, stop_all

FAST_RESTARTS = RestartPolicy(backoff_s=0.01, max_backoff_s=0.05, attempts=3)


def spec(seed: int, size: int = 512, steps: int = 2):
    from qwen_image_server.engine.types import GenerationSpec

    return GenerationSpec(f"prompt {seed}", " ", size, size, steps, 4.0, seed)


class Engines:
    """The engines a slot's factory hands out, in order, so a test sees each restart's engine."""

    def __init__(self) -> None:
        self.made: dict[int, list[FakeEngine]] = {}
        self.load_failures: dict[int, int] = {}  # slot -> loads to fail from its next one on
        self._loaded = threading.Condition()

    def factory(self, slot: int) -> Callable[[], FakeEngine]:
        def load() -> FakeEngine:
            with self._loaded:
                if self.load_failures.get(slot) and self.made.get(slot):
                    self.load_failures[slot] -= 1
                    raise RuntimeError(f"fake: engine {slot} cannot load")
                engine = FakeEngine(held=True)
                self.made.setdefault(slot, []).append(engine)
                self._loaded.notify_all()
                return engine

        return load

    def wait_made(self, slot: int, count: int) -> FakeEngine:
        with self._loaded:
            assert self._loaded.wait_for(lambda: len(self.made.get(slot, [])) >= count, WAIT), \
                f"engine {slot} was not loaded {count} times"
            return self.made[slot][count - 1]


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[Scheduler, Engines]]]:
    made: list[Scheduler] = []

    def factory(count: int = 2, restart: RestartPolicy | None = FAST_RESTARTS,
                **config) -> tuple[Scheduler, Engines]:
        engines = Engines()
        cfg = dict(max_queue=32, max_batch_size=4, max_batch_pixels=64 * 512 * 512)
        cfg.update(config)
        scheduler = Scheduler([engines.factory(i) for i in range(count)], SchedulerConfig(**cfg),
                              restart=restart)
        scheduler.start()
        made.append(scheduler)
        for i in range(count):
            engines.wait_made(i, 1)
        return scheduler, engines

    yield factory
    stop_all(made)


def wait_for(scheduler: Scheduler, predicate: Callable[[], bool], what: str) -> None:
    assert scheduler.wait_until(predicate, WAIT), what


def test_each_idle_engine_takes_the_next_batch(make):
    s, engines = make(count=2, max_batch_size=1)
    a, b = engines.wait_made(0, 1), engines.wait_made(1, 1)
    first, second, third = (s.submit(spec(i), i) for i in range(3))
    a.wait_started(), b.wait_started()
    assert {first.engine, second.engine} == {0, 1}  # both run at once
    assert s.stats().running_batch_size == 2 and s.queue_position(third) == 0
    runs_first = a if first.engine == 0 else b
    runs_first.run_freely()  # the engine that finishes first takes the third job
    assert result_of(first).engine == first.engine
    assert result_of(third).engine == first.engine
    (b if runs_first is a else a).run_freely()
    assert result_of(second).engine == second.engine
    stats = s.stats()
    assert [e.batches for e in stats.engines] == ([2, 1] if first.engine == 0 else [1, 2])
    assert stats.processed == 3 and stats.batches == 3


def test_fairness_bound_holds_across_engines(make):
    s, engines = make(count=2)
    a, b = engines.wait_made(0, 1), engines.wait_made(1, 1)
    blockers = [s.submit(spec(1000), 1000), s.submit(spec(1001, size=1024), 1001)]
    a.wait_started(), b.wait_started()
    rng = random.Random(7)
    sizes = [rng.choice([512, 768, 1024]) for _ in range(24)]
    jobs = [s.submit(spec(i, size=size), i) for i, size in enumerate(sizes)]
    a.run_freely(), b.run_freely()
    for job in [*blockers, *jobs]:
        result_of(job)
    first = min(job.batch_id for job in jobs)
    for position, job in enumerate(jobs):
        # Batches are numbered in the order they start, on whichever engine: with p jobs ahead
        # of it, a job starts in one of the next p + 1 batches.
        assert job.batch_id - first <= position
    assert {job.engine for job in jobs} == {0, 1}


def test_a_lost_engine_batch_is_retried_on_another_and_queued_jobs_keep_waiting(make):
    s, engines = make(count=2, max_batch_size=2)
    a, b = engines.wait_made(0, 1), engines.wait_made(1, 1)
    jobs = s.submit_many([spec(0), spec(1)], 0)  # queued together: one batch of two
    wait_for(s, lambda: jobs[0].engine is not None, "the batch to start")
    assert jobs[1].engine == jobs[0].engine
    doomed = a if jobs[0].engine == 0 else b
    doomed.wait_started()
    queued = [s.submit(spec(i), i) for i in range(2, 8)]
    doomed.faults.append(EngineLost("fake: the engine process was killed"))
    doomed.allow_steps(2)  # the batch dies at its end, after every step
    slot = jobs[0].engine
    replacement = engines.wait_made(slot, 2)
    for engine in (a, b, replacement):
        engine.run_freely()
    for job in [*jobs, *queued]:
        assert result_of(job).image.size == (512, 512)
    assert all(job.crashes == 1 for job in jobs) and not any(job.crashes for job in queued)
    # The retried jobs ran alone (a batch-mate that broke the engine would not take them along).
    assert all(result_of(job).batch_size == 1 for job in jobs)
    stats = s.stats()
    assert stats.engines[slot].restarts == 1 and stats.failed == 0 and stats.processed == 8


def test_a_job_that_fails_two_engines_fails_alone_with_500(make):
    s, engines = make(count=1, max_batch_size=2)
    engine = engines.wait_made(0, 1)
    poison, innocent = s.submit(spec(0), 0), s.submit(spec(1), 1)
    engine.wait_started()
    engine.faults.append(EngineLost("fake: killed"))
    engine.run_freely()
    second = engines.wait_made(0, 2)
    second.faults.append(EngineLost("fake: killed again"))  # the poison job runs first, alone
    second.run_freely()
    third = engines.wait_made(0, 3)
    third.run_freely()
    failure = poison.future.exception(timeout=WAIT)
    assert isinstance(failure, errors.InferenceFailed) and failure.status_code == 500
    assert result_of(innocent).image.size == (512, 512)
    assert result_of(s.submit(spec(2), 2)).image.size == (512, 512)  # the next request succeeds
    assert s.stats().engines[0].restarts == 2 and not s.dead


def test_idle_loss_restarts_the_slot_without_waiting_for_work():
    engines: list[ProcessLikeEngine] = []
    loaded = threading.Condition()

    def load() -> ProcessLikeEngine:
        engine = ProcessLikeEngine()  # supervised, as an engine process is: it can be watched and closed
        with loaded:
            engines.append(engine)
            loaded.notify_all()
        return engine

    s = Scheduler([load], SchedulerConfig(), restart=FAST_RESTARTS)
    s.start()
    try:
        with loaded:
            assert loaded.wait_for(lambda: engines and engines[0].exit_hooks, WAIT)
        engines[0].exit()  # the engine's process ended while nothing ran
        with loaded:
            assert loaded.wait_for(lambda: len(engines) == 2, WAIT), "no new engine was started"
        wait_for(s, lambda: s.serving, "the new engine to serve")
        assert s.stats().engines[0].restarts == 1
        assert result_of(s.submit(spec(1), 1)).engine == 0
    finally:
        s.stop(), s.join(WAIT)


def test_an_engine_that_cannot_be_restarted_is_given_up_and_the_others_serve(make):
    s, engines = make(count=2, max_batch_size=1)
    engines.load_failures[0] = FAST_RESTARTS.attempts
    a, b = engines.wait_made(0, 1), engines.wait_made(1, 1)
    jobs = [s.submit(spec(i), i) for i in range(2)]
    a.wait_started(), b.wait_started()
    on_a = next(job for job in jobs if job.engine == 0)
    a.faults.append(EngineLost("fake: the GPU fell off the bus"))
    a.run_freely()
    wait_for(s, lambda: s.stats().engines[0].state is SlotState.FAILED, "engine 0 to be given up")
    b.run_freely()
    assert result_of(on_a).engine == 1  # retried on the engine that is left
    assert s.ready and not s.dead
    assert result_of(s.submit(spec(2), 2)).engine == 1


def test_the_scheduler_is_dead_only_when_no_engine_can_be_restarted(make):
    s, engines = make(count=1)
    engines.load_failures[0] = FAST_RESTARTS.attempts
    engine = engines.wait_made(0, 1)
    job = s.submit(spec(0), 0)
    engine.wait_started()
    engine.faults.append(EngineLost("fake: killed"))
    engine.run_freely()
    wait_for(s, lambda: s.dead, "the scheduler to give up")
    assert isinstance(job.future.exception(timeout=WAIT), errors.EngineDead)
    assert not s.ready


def test_without_a_restart_policy_a_device_failure_kills_the_scheduler_as_before(make):
    s, engines = make(count=1, restart=None)
    engine = engines.wait_made(0, 1)
    job = s.submit(spec(0), 0)
    engine.wait_started()
    engine.faults.append(EngineLost("fake"))
    engine.run_freely()
    assert isinstance(job.future.exception(timeout=WAIT), errors.EngineDead)
    assert s.dead and len(engines.made[0]) == 1
