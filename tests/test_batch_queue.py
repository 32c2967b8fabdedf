"""The batching policy alone (`scheduler/queue.py`), without threads, engines or time: which jobs
the next batch takes, who may join the queue, who waited too long, and how long a refused client
should wait. Each test builds a queue, calls it, and reads the answer, as TGI tests its
`State::next_batch`."""

from __future__ import annotations

import math

import pytest

from qwen_image_server import errors
from qwen_image_server.engine.types import EditSpec, GenerationSpec
from qwen_image_server.job_state import JobState
from qwen_image_server.scheduler import BatchQueue, Job, SchedulerConfig


def job(seed: int, size: int = 512, steps: int = 2, *, deadline: float = math.inf, crashes: int = 0,
        **spec: object) -> Job:
    made = Job(spec=GenerationSpec(f"prompt {seed}", " ", size, size, steps, 4.0, seed, **spec),  # type: ignore[arg-type]
               request_id=seed, submitted_at=0.0, deadline=deadline)
    made.crashes = crashes
    return made


def queue(*jobs: Job, **config: object) -> BatchQueue:
    settings = dict(max_queue=32, max_batch_size=4, max_batch_pixels=64 * 512 * 512)
    settings.update(config)
    made = BatchQueue(SchedulerConfig(**settings))  # type: ignore[arg-type]
    made.push(jobs)
    return made


def seeds(batch: list[Job]) -> list[int]:
    return [j.spec.seed for j in batch]


def test_the_head_runs_next_with_the_jobs_of_its_shape_behind_it():
    q = queue(job(0), job(1, size=1024), job(2), job(3, steps=4), job(4), job(5), job(6))
    assert seeds(q.next_batch()) == [0, 2, 4, 5]  # 4 at most; 1024 px and 4 steps are other shapes
    assert len(q) == 7  # nothing leaves the queue until the batch starts


def test_a_model_a_lora_or_a_cfg_scale_is_a_shape_of_its_own():
    q = queue(job(0), job(1, model="edit"), job(2, loras=(("ink", 1.0),)), job(3))
    assert seeds(q.next_batch()) == [0, 3]


def test_the_pixel_budget_caps_the_batch_and_a_large_head_runs_alone():
    q = queue(*(job(i) for i in range(6)), max_batch_pixels=3 * 512 * 512)
    assert seeds(q.next_batch()) == [0, 1, 2]
    big = queue(job(0, size=1024), job(1, size=1024), max_batch_pixels=512 * 512)
    assert seeds(big.next_batch()) == [0]  # over the budget alone still runs, one at a time


def test_a_job_whose_engine_failed_runs_alone_and_joins_no_batch():
    q = queue(job(0, crashes=1), job(1), job(2))
    assert seeds(q.next_batch()) == [0] and q.full(q.next_batch())
    again = queue(job(0), job(1, crashes=1), job(2))
    assert seeds(again.next_batch()) == [0, 2]


def test_starting_a_batch_counts_every_job_it_overtook():
    jobs = [job(0), job(1, size=1024), job(2), job(3, size=1024), job(4)]
    q = queue(*jobs)
    batch = q.next_batch()
    q.start(batch, engine=1, batch_id=7, now=5.0)
    assert [j.overtaken for j in jobs] == [0, 2, 0, 1, 0]  # job 1 saw 2 and 4 pass, job 3 saw 4
    assert all(j.state is JobState.RUNNING and j.batch_id == 7 and j.engine == 1 and j.started_at == 5.0
               for j in batch)
    assert [j.spec.seed for j in q] == [1, 3] and q.position(jobs[3]) == 1 and q.position(jobs[0]) is None


def test_a_job_with_p_jobs_ahead_starts_within_p_plus_one_batches():
    # Every shape and order the fairness rule could meet: the last job must start in at most
    # (jobs ahead of it) + 1 batches.
    sizes = [512, 1024, 512, 768, 1024, 512, 768, 512, 512, 1024]
    jobs = [job(i, size=size) for i, size in enumerate(sizes)]
    q = queue(*jobs, max_batch_size=3)
    started_in: dict[int, int] = {}
    for number in range(1, len(jobs) + 1):
        batch = q.next_batch()
        if not batch:
            break
        q.start(batch, engine=0, batch_id=number, now=0.0)
        started_in.update({j.spec.seed: number for j in batch})
    assert len(started_in) == len(jobs)
    assert all(started_in[i] <= i + 1 for i in range(len(jobs))), started_in


def test_admission_refuses_too_many_for_any_queue_and_a_full_queue_with_retry_after():
    q = queue(*(job(i) for i in range(3)), max_queue=4)
    q.admit(1, retry_after=lambda: 9)
    with pytest.raises(errors.QueueFull) as full:
        q.admit(2, retry_after=lambda: 9)
    assert full.value.retry_after == 9 and "3 of 4" in full.value.message
    with pytest.raises(errors.InvalidRequest) as never:
        q.admit(5, retry_after=lambda: 9)
    assert never.value.param == "n"


def test_expired_jobs_leave_the_queue_and_the_nearest_deadline_is_the_next_wake():
    late, soon, retried = job(0, deadline=10.0), job(1, deadline=20.0), job(2)  # a retry: no deadline
    q = queue(late, soon, retried)
    assert q.nearest_deadline() == 10.0
    assert q.expired(15.0) == [late] and [j.spec.seed for j in q] == [1, 2]
    assert q.nearest_deadline() == 20.0


def test_retries_go_back_to_the_head_in_order():
    q = queue(job(5))
    q.push_front([job(1), job(2)])
    assert [j.spec.seed for j in q] == [1, 2, 5]


def test_retry_after_counts_the_running_batch_and_one_batch_ahead():
    q = queue(*(job(i) for i in range(10)), max_batch_size=4)
    assert q.retry_after(per_job=2.0, running=4) == 16  # 4 running + 4 of the 10 waiting, 2 s each
    assert q.retry_after(per_job=None, running=0) == 4  # nothing measured yet: 1 s a job
    assert queue().retry_after(per_job=0.1, running=0) == 1


def test_edits_batch_only_with_edits_of_the_same_inputs_shape():
    from PIL import Image

    one = (Image.new("RGB", (64, 64)),)
    two = (Image.new("RGB", (64, 64)), Image.new("RGB", (32, 32)))

    def edit(seed: int, images: tuple[Image.Image, ...]) -> Job:
        return Job(spec=EditSpec(f"edit {seed}", " ", 512, 512, 2, 4.0, seed, images=images),
                   request_id=seed, submitted_at=0.0, deadline=math.inf)

    q = queue(edit(0, one), job(1), edit(2, two), edit(3, one))
    assert seeds(q.next_batch()) == [0, 3]


def owned(owner: str, seed: int, size: int = 512) -> Job:
    made = job(seed, size)
    made.owner = owner
    return made


def run_batches(q: BatchQueue, count: int) -> list[list[str | None]]:
    """Start `count` batches in turn; the owners of each."""
    started = []
    for batch_id in range(count):
        batch = q.next_batch()
        q.start(batch, engine=0, batch_id=batch_id, now=0.0)
        started.append([j.owner for j in batch])
    return started


def test_one_key_with_a_full_queue_delays_another_keys_job_by_one_batch_not_by_its_backlog():
    q = queue(max_batch_size=1)
    q.push([owned("a", i) for i in range(30)])
    late = owned("b", 100)
    q.push([late])
    assert q.position(late) == 1  # behind a's first job only
    assert run_batches(q, 2) == [["a"], ["b"]]


def test_keys_take_turns_and_a_key_that_returns_joins_the_round_being_served():
    q = queue(max_batch_size=1)
    q.push([owned("a", i) for i in range(6)])
    q.push([owned("b", 10 + i) for i in range(2)])
    assert run_batches(q, 4) == [["a"], ["b"], ["a"], ["b"]]
    # b, back after its jobs ran, neither jumps ahead of a's waiting round nor waits behind all of a's jobs.
    q.push([owned("b", 20)])
    assert run_batches(q, 3) == [["a"], ["b"], ["a"]]


def test_without_keys_the_order_is_arrival_and_batches_still_pull_forward_across_keys():
    q = queue(*(job(i) for i in range(5)))
    assert seeds(q.next_batch()) == [0, 1, 2, 3]
    mixed = queue(max_batch_size=4)
    mixed.push([owned("a", 0), owned("a", 1, size=1024), owned("a", 2)])
    mixed.push([owned("b", 3)])
    # One shape: b's job rides along in the head's batch, whatever its round.
    assert seeds(mixed.next_batch()) == [0, 3, 2]
