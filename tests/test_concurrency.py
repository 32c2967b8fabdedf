"""The scheduler over HTTP: concurrency, batching equality, disconnects, overload, queue timeouts,
and fault isolation with faults raised from inside the pipeline.

Where the pixels are at stake (batching equality, faults inside the real pipeline)
the server runs the tiny model; where only who waits, who runs and what each client is answered
are, it runs the fake engine, whose images cost nothing (a tiny-model image is mostly its VAE
decode: seconds on a CPU)."""

from __future__ import annotations

import io
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from PIL import Image

from tests.conftest import LiveServer, hold_engine, open_request, wait_until
from tests.fakes import FakeEngine

STEPS2 = {"num_inference_steps": 2}


def post(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=timeout)


def test_eight_concurrent_requests_all_succeed_with_unique_ids_in_full_batches(server):
    live = server(engine=FakeEngine, max_batch_size=4)
    bodies = [{"prompt": f"a cat number {i}", "seed": i, **STEPS2} for i in range(8)]
    with ThreadPoolExecutor(8) as pool, hold_engine(live) as hook:
        first = pool.submit(post, live.url, bodies[0])
        live.wait_running()
        rest = [pool.submit(post, live.url, b) for b in bodies[1:]]
        live.wait_scheduler("seven queued requests", queue_length=7)
        hook.release()
        responses = [first.result()] + [f.result() for f in rest]
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.headers["X-Request-ID"] for r in responses}) == 8
    # The first ran alone; the seven that waited behind it ran as batches of 4 (the limit) and 3.
    assert sorted(int(r.headers["X-Batch-Size"]) for r in responses) == [1, 3, 3, 3, 4, 4, 4, 4]
    assert sorted(len(call) for call in hook.calls) == [1, 3, 4]


def test_waiting_time_is_reported_in_x_queue_time(server):
    live = server(engine=FakeEngine)
    held = 0.5  # how long the second request waits behind the first: what its header must say
    with ThreadPoolExecutor(2) as pool, hold_engine(live) as hook:
        blocker = pool.submit(post, live.url, {"prompt": "blocker", **STEPS2})
        live.wait_running()
        sent = time.monotonic()
        waiting = pool.submit(post, live.url, {"prompt": "waiter", "seed": 9, **STEPS2})
        live.wait_scheduler("the second request to queue", queue_length=1)
        time.sleep(held)  # the wait being measured, not a wait for something to happen
        hook.release()
        released = time.monotonic()
        first, second = blocker.result(), waiting.result()
    assert first.status_code == second.status_code == 200
    # Seconds from submission to the start of its batch: at least the time the test held it, at
    # most the time from sending it to the release (the header has 3 decimals).
    waited = float(second.headers["X-Queue-Time"])
    assert held <= waited <= released - sent + 0.001, (held, waited, released - sent)
    assert float(first.headers["X-Queue-Time"]) < held  # the first found the engine idle


def queue_in_order(pool: ThreadPoolExecutor, live: LiveServer, bodies: list[dict]) -> list:
    """Send `bodies` one by one, each once the previous one is queued: a known queue order."""
    futures = []
    queued = live.scheduler()["queue_length"]
    for body in bodies:
        futures.append(pool.submit(post, live.url, body))
        queued += 1
        live.wait_scheduler(f"{queued} queued jobs", queue_length=queued)
    return futures


def test_batched_images_equal_solo_images(tiny_server, tiny_hook):
    bodies = [{"prompt": p, "seed": s, **STEPS2, "add_overlay": False}
              for p, s in (("a red fox in snow", 11), ("a lighthouse at dusk", 12))]
    with ThreadPoolExecutor(3) as pool, hold_engine(tiny_server):
        blocker = pool.submit(post, tiny_server.url, {"prompt": "blocker", **STEPS2})
        tiny_server.wait_running(what="the blocker to run")
        batched = queue_in_order(pool, tiny_server, bodies)
        tiny_hook.release()
        batched = [f.result() for f in batched]
        assert blocker.result().status_code == 200
    assert [r.headers["X-Batch-Size"] for r in batched] == ["2", "2"]
    solo = [post(tiny_server.url, b) for b in bodies]
    assert [r.headers["X-Batch-Size"] for r in solo] == ["1", "1"]
    for one, alone in zip(batched, solo, strict=True):
        a = Image.open(io.BytesIO(one.content)).convert("RGB")
        b = Image.open(io.BytesIO(alone.content)).convert("RGB")
        worst = max(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True))
        # fp32 matmuls of a different batch shape may round differently; never visibly.
        assert worst <= 1, f"batched image differs from solo by {worst} levels"


def test_disconnect_while_queued_frees_the_slot_and_never_runs(server):
    live = server(engine=FakeEngine, max_queue=1)
    with ThreadPoolExecutor(2) as pool, hold_engine(live) as hook:
        blocker = pool.submit(post, live.url, {"prompt": "blocker", **STEPS2})
        live.wait_running(what="the blocker to run")
        impatient = open_request(live.url, "/generate", {"prompt": "impatient", **STEPS2})
        live.wait_scheduler("the impatient job to queue", queue_length=1)
        impatient.close()  # the client gives up and closes the connection
        live.wait_scheduler("the job to be cancelled", cancelled=1, queue_length=0)
        follow_up = pool.submit(post, live.url, {"prompt": "next", **STEPS2})
        live.wait_scheduler("the next job to queue", queue_length=1)  # the freed slot
        hook.release()
        assert blocker.result().status_code == 200 and follow_up.result().status_code == 200
    stats = live.scheduler()
    assert stats["processed"] == 2 and stats["batches"] == 2  # the impatient job never ran
    assert len(hook.calls) == 2


def test_overload_gives_429_with_retry_after_and_answers_everyone(server):
    live = server(engine=FakeEngine, max_queue=2)
    with ThreadPoolExecutor(10) as pool, hold_engine(live) as hook:
        first = pool.submit(post, live.url, {"prompt": "first", **STEPS2})
        live.wait_running(what="the first job to run")
        rest = [pool.submit(post, live.url, {"prompt": f"p{i}", **STEPS2}) for i in range(9)]
        live.wait_scheduler("seven rejections", rejected=7, queue_length=2)
        # Refused at once, while the engine is still held: nobody waits for a full queue. (The
        # server counts a refusal just before its client reads the 429: wait for the clients.)
        wait_until(lambda: sum(f.done() for f in rest) == 7, 30, "seven clients to read their 429")
        refused = [f.result() for f in rest if f.done()]
        assert len(refused) == 7 and {r.status_code for r in refused} == {429}
        hook.release()
        responses = [first.result()] + [f.result() for f in rest]
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [429] * 7
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["type"] == "queue_full"
        assert f"retry in {r.headers['Retry-After']} s" in error["message"]


def test_retry_after_is_estimated_from_recent_job_times(server):
    # Each step of this engine takes 0.6 s of work, so a job takes over a second: far from the
    # 1 s per job assumed before any job has run.
    live = server(engine=lambda: FakeEngine(step_seconds=0.6), max_queue=1, max_batch_size=1)
    body = {"prompt": "a job that takes its time", **STEPS2}
    assert post(live.url, body).status_code == 200
    per_job = live.scheduler()["mean_inference_time"]  # one image per batch: one job's time
    assert per_job >= 1.2
    with ThreadPoolExecutor(2) as pool, hold_engine(live):
        running = pool.submit(post, live.url, body)
        live.wait_running()
        queued = pool.submit(post, live.url, body)
        live.wait_scheduler("a full queue", queue_length=1)
        refused = post(live.url, body)
    assert running.result().status_code == queued.result().status_code == 200
    assert refused.status_code == 429
    # Two jobs are ahead of a slot (the running one and the queued one), each about per_job long.
    retry_after = int(refused.headers["Retry-After"])
    assert math.ceil(2 * per_job - 0.01) <= retry_after <= math.ceil(2 * per_job + 0.01)  # /info rounds
    assert retry_after >= 3


def test_a_job_waiting_past_the_queue_timeout_gets_504(server):
    live = server(engine=FakeEngine, queue_timeout_s=0.5)
    with ThreadPoolExecutor(2) as pool, hold_engine(live):
        blocker = pool.submit(post, live.url, {"prompt": "blocker", **STEPS2})
        live.wait_running()
        late = post(live.url, {"prompt": "late", **STEPS2})  # answered while the engine is held
        assert late.status_code == 504
        error = late.json()["error"]
        assert error["type"] == "queue_timeout" and "0.5 s" in error["message"]
        assert live.scheduler()["timed_out"] == 1
    assert blocker.result().status_code == 200


def test_pipeline_exception_is_a_500_and_the_next_request_succeeds(server):
    live = server()
    live.hook.fail_next(RuntimeError("injected fault in the pipeline"))
    r = post(live.url, {"prompt": "x", **STEPS2})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "inference_error" and "injected" not in error["message"]
    assert "Traceback" not in r.text
    assert post(live.url, {"prompt": "x", **STEPS2}).status_code == 200
    assert live.scheduler()["failed"] == 1


def test_out_of_memory_retries_the_batch_one_image_at_a_time_then_503(server):
    live = server(max_batch_size=4)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    bodies = [{"prompt": f"image {seed}", "seed": seed, **STEPS2} for seed in (1, 2, 3)]
    with ThreadPoolExecutor(4) as pool, hold_engine(live) as hook:
        blocker = pool.submit(post, live.url, {"prompt": "blocker", "seed": 100, **STEPS2})
        live.wait_running()
        batch = queue_in_order(pool, live, bodies)
        # The batch of three runs out of memory; alone, images 1 and 3 fit and image 2 does not.
        hook.fail_next(oom, None, oom, None)
        hook.release()
        responses = [f.result() for f in batch]
        assert blocker.result().status_code == 200
    assert hook.calls == [[100], [1, 2, 3], [1], [2], [3]]
    assert [r.status_code for r in responses] == [200, 503, 200]
    assert [r.headers.get("X-Batch-Size") for r in responses] == ["1", None, "1"]
    error = responses[1].json()["error"]
    assert error["type"] == "out_of_memory" and "512x512" in error["message"]
    assert int(responses[1].headers["Retry-After"]) >= 1


def test_cuda_failure_marks_the_engine_dead_and_stops_the_server(server):
    live = server()
    live.hook.fail_next(RuntimeError("CUDA error: an illegal memory access was encountered"))
    r = post(live.url, {"prompt": "x", **STEPS2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
    assert live.server.exit_code() == 1  # the process manager will start a fresh worker
    live.thread.join(30)
    assert not live.thread.is_alive(), "the server should stop so it can be restarted"
