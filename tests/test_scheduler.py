"""Scheduler behaviour with a fake engine (no model): batching, fairness, backpressure,
cancellation, deadlines, fault isolation and draining."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pytest

from qwen_image_server import errors
from qwen_image_server.engine.types import DeviceFailure, GenerationSpec
from qwen_image_server.job_state import JobState
from qwen_image_server.scheduler import Job, Scheduler, SchedulerConfig
from tests.fakes import WAIT, FakeEngine, result_of, stop_all


def spec(seed: int, size: int = 512, steps: int = 2, cfg: float = 4.0) -> GenerationSpec:
    return GenerationSpec(f"prompt {seed}", " ", size, size, steps, cfg, seed)


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[Scheduler, FakeEngine]]]:
    made: list[Scheduler] = []

    def factory(engine: FakeEngine | None = None, on_fatal=None, **config) -> tuple[Scheduler, FakeEngine]:
        engine = engine or FakeEngine(held=True)
        cfg = dict(max_queue=32, max_batch_size=4, max_batch_pixels=64 * 512 * 512)
        cfg.update(config)
        scheduler = Scheduler(lambda: engine, SchedulerConfig(**cfg), on_fatal=on_fatal)
        scheduler.start()
        made.append(scheduler)
        return scheduler, engine

    yield factory
    stop_all(made)


def error_of(job: Job) -> BaseException:
    exc = job.future.exception(timeout=WAIT)
    assert exc is not None, f"job {job.request_id} succeeded"
    return exc


def test_compatible_jobs_are_pulled_into_one_batch_behind_the_head(make):
    s, engine = make()
    first = s.submit(spec(0), 0)
    engine.wait_started()
    jobs = [s.submit(spec(1), 1), s.submit(spec(2, size=1024), 2), s.submit(spec(3), 3),
            s.submit(spec(4), 4), s.submit(spec(5), 5), s.submit(spec(6), 6)]
    engine.run_freely()
    for job in [first, *jobs]:
        result_of(job)
    # 512px jobs 1,3,4,5 share a batch (max 4); the 1024px job 2 is next (it became the head);
    # job 6 did not fit the first batch and runs last.
    assert engine.batches == [[0], [1, 3, 4, 5], [2], [6]]
    assert result_of(jobs[1]).batch_size == 1 and result_of(jobs[0]).batch_size == 4
    assert jobs[1].overtaken == 3  # jobs 3, 4 and 5 started before it


def test_pixel_budget_limits_batch_size(make):
    s, engine = make(max_batch_pixels=2 * 512 * 512)
    first = s.submit(spec(0), 0)
    engine.wait_started()
    jobs = [s.submit(spec(i), i) for i in range(1, 6)]
    engine.run_freely()
    for job in [first, *jobs]:
        result_of(job)
    assert engine.batches == [[0], [1, 2], [3, 4], [5]]


def test_fairness_no_job_starts_later_than_fifo_counted_in_batches(make):
    s, engine = make()
    blocker = s.submit(spec(1000), 1000)
    engine.wait_started()
    rng = random.Random(7)
    sizes = [rng.choice([512, 768, 1024]) for _ in range(24)]
    jobs = [s.submit(spec(i, size=size), i) for i, size in enumerate(sizes)]
    engine.run_freely()
    for job in [blocker, *jobs]:
        result_of(job)
    batch_of = {seed: index for index, batch in enumerate(engine.batches[1:]) for seed in batch}
    for position, job in enumerate(jobs):
        # The bound: with p jobs ahead of it, a job starts in one of the next p + 1 batches.
        assert batch_of[job.spec.seed] <= position
    assert any(job.overtaken for job in jobs), "the mix should have pulled some jobs forward"


def test_queue_full_answers_429_at_the_exact_limit_and_loses_nothing(make):
    s, engine = make(max_queue=3)
    running = s.submit(spec(0), 0)
    engine.wait_started()
    queued = [s.submit(spec(i), i) for i in range(1, 4)]
    with pytest.raises(errors.QueueFull) as refused:
        s.submit(spec(9), 9)
    assert refused.value.status_code == 429 and refused.value.retry_after >= 1
    assert s.stats().rejected == 1 and s.stats().queue_length == 3
    engine.run_freely()
    for job in [running, *queued]:
        assert result_of(job).image.size == (512, 512)


def test_cancel_while_queued_never_runs(make):
    s, engine = make()
    running = s.submit(spec(0), 0)
    engine.wait_started()
    doomed = s.submit(spec(1), 1)
    kept = s.submit(spec(2), 2)
    assert s.cancel(doomed)
    assert isinstance(error_of(doomed), errors.JobCancelled)
    assert s.queue_position(kept) == 0
    engine.run_freely()
    result_of(running), result_of(kept)
    assert all(1 not in batch for batch in engine.batches)
    assert s.stats().cancelled == 1


def test_cancel_running_batch_stops_at_next_step_without_decoding(make):
    s, engine = make()
    job = s.submit(spec(0, steps=10), 0)
    engine.wait_started()
    engine.allow_steps(2)
    assert s.cancel(job)
    engine.allow_steps(1)
    assert isinstance(error_of(job), errors.JobCancelled)
    assert engine.finished == []  # never reached the end of the loop (no decode)
    assert job.step <= 3
    # The engine is free again for the next job.
    engine.run_freely()
    assert result_of(s.submit(spec(1), 1)).batch_size == 1


def test_cancelling_one_job_of_a_batch_keeps_the_others(make):
    s, engine = make()
    first = s.submit(spec(0), 0)
    engine.wait_started()
    a, b = s.submit(spec(1), 1), s.submit(spec(2), 2)
    engine.allow_steps(2)  # finish the first batch
    result_of(first)
    engine.wait_started()  # a and b now run together
    assert s.cancel(a)
    engine.run_freely()
    assert isinstance(error_of(a), errors.JobCancelled)
    assert result_of(b).batch_size == 2


def test_deadline_fails_a_waiting_job_with_504_while_the_engine_is_busy(make):
    s, engine = make(queue_timeout_s=0.2)
    running = s.submit(spec(0), 0)
    engine.wait_started()
    late = s.submit(spec(1), 1)
    exc = error_of(late)
    assert isinstance(exc, errors.QueueTimeout) and exc.status_code == 504
    assert running.state is JobState.RUNNING  # answered without waiting for the engine
    engine.run_freely()
    result_of(running)
    assert all(1 not in batch for batch in engine.batches)
    assert s.stats().timed_out == 1


def test_pipeline_exception_fails_only_its_batch(make):
    s, engine = make(engine=FakeEngine())
    engine.faults.append(RuntimeError("boom in forward"))
    exc = error_of(s.submit(spec(0), 0))
    assert isinstance(exc, errors.InferenceFailed) and exc.status_code == 500
    assert "boom" not in exc.message  # no internals leak to the client
    assert result_of(s.submit(spec(1), 1)).image.size == (512, 512)
    assert not s.dead


def test_out_of_memory_retries_jobs_one_by_one(make):
    s, engine = make()
    first = s.submit(spec(0), 0)
    engine.wait_started()
    jobs = [s.submit(spec(i), i) for i in (1, 2, 3)]
    engine.oom_above = 1
    engine.run_freely()
    for job in [first, *jobs]:
        assert result_of(job).batch_size == 1
    assert [1, 2, 3] in engine.batches and engine.finished[1:] == [[1], [2], [3]]
    assert engine.freed == 1


def test_out_of_memory_for_a_single_job_is_503(make):
    s, engine = make(engine=FakeEngine())
    engine.oom_above = 0
    exc = error_of(s.submit(spec(0), 0))
    assert isinstance(exc, errors.OutOfMemory) and exc.status_code == 503
    assert not s.dead


def test_device_failure_kills_the_engine_and_everything_waiting(make):
    fatal: list[BaseException] = []
    s, engine = make(on_fatal=fatal.append)
    running = s.submit(spec(0), 0)
    engine.wait_started()
    waiting = s.submit(spec(1, size=1024), 1)
    engine.faults.append(DeviceFailure("CUDA error: an illegal memory access"))
    engine.run_freely()
    for job in (running, waiting):
        assert isinstance(error_of(job), errors.EngineDead)
    assert s.dead and not s.ready
    assert len(fatal) == 1 and isinstance(fatal[0], DeviceFailure)
    with pytest.raises(errors.EngineDead):
        s.submit(spec(2), 2)


def test_load_failure_answers_queued_jobs_and_reports_fatal(make):
    fatal: list[BaseException] = []
    gate = threading.Event()

    def failing_factory():
        gate.wait(WAIT)
        raise errors.ModelLoadError("no such model")

    s = Scheduler(failing_factory, SchedulerConfig(), on_fatal=fatal.append)
    s.start()
    job = s.submit(spec(0), 0)  # accepted while the model loads
    gate.set()
    assert isinstance(error_of(job), errors.EngineDead)
    assert isinstance(fatal[0], errors.ModelLoadError) and not s.loaded
    s.join(WAIT)


def test_drain_finishes_accepted_jobs_and_refuses_new_ones(make):
    s, engine = make()
    jobs = [s.submit(spec(i), i) for i in range(3)]
    engine.wait_started()
    s.begin_drain()
    assert not s.ready
    with pytest.raises(errors.ShuttingDown) as refused:
        s.submit(spec(9), 9)
    assert refused.value.status_code == 503
    engine.run_freely()
    assert s.wait_idle(WAIT)
    assert all(result_of(job).image for job in jobs)


def test_shutdown_after_drain_timeout_answers_what_is_left(make):
    s, engine = make()
    running = s.submit(spec(0, steps=50), 0)
    engine.wait_started()
    queued = s.submit(spec(1), 1)
    assert not s.wait_idle(0.05)
    s.begin_drain()
    s.stop()
    engine.run_freely()
    s.join(WAIT)
    for job in (running, queued):
        assert isinstance(error_of(job), errors.ShuttingDown)


def test_progress_events_reach_listeners(make):
    s, engine = make()
    events: list[tuple[str, int]] = []
    done = threading.Event()
    job = s.submit(spec(0, steps=3), 0)

    def listen(j: Job, event: str) -> None:
        events.append((event, j.step))
        if event == "succeeded":
            done.set()

    s.add_listener(job, listen)
    engine.run_freely()
    result_of(job)
    assert done.wait(WAIT)
    steps = [step for event, step in events if event == "step"]
    assert steps == sorted(steps) and steps[-1] == 3
    assert events[-1][0] == "succeeded"


def test_jobs_submitted_together_run_as_one_batch_even_on_an_idle_engine(make):
    s, engine = make(engine=FakeEngine())
    jobs = s.submit_many([spec(0), spec(1), spec(2)], request_id=1)
    assert [result_of(job).batch_size for job in jobs] == [3, 3, 3]
    assert engine.batches == [[0, 1, 2]]


def test_submit_many_queues_all_or_nothing(make):
    s, engine = make(max_queue=3)
    running = s.submit(spec(0), 0)
    engine.wait_started()
    waiting = s.submit(spec(1), 1)
    with pytest.raises(errors.QueueFull) as full:
        s.submit_many([spec(2), spec(3), spec(4)], request_id=2)
    assert "1 of 3 places taken" in full.value.message
    assert s.stats().queue_length == 1
    # More images than the queue ever holds: retrying cannot help, so 400 naming n, not 429.
    with pytest.raises(errors.InvalidRequest) as too_many:
        s.submit_many([spec(i) for i in range(4)], request_id=3)
    assert too_many.value.status_code == 400 and too_many.value.param == "n"
    assert s.stats().queue_length == 1
    engine.run_freely()
    result_of(running)
    result_of(waiting)
