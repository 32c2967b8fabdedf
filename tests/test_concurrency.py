"""The scheduler on the real tiny model over HTTP: concurrency, batching equality, disconnects,
overload, and fault isolation with an injected fault in the pipeline."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from tests.conftest import LiveServer, wait_until


def post(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=timeout)


def test_eight_concurrent_requests_all_succeed_with_unique_ids(tiny_server):
    bodies = [{"prompt": f"a cat number {i}", "seed": i, "num_inference_steps": 2} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(tiny_server.url, b), bodies))
    assert [r.status_code for r in responses] == [200] * 8
    ids = {r.headers["X-Request-ID"] for r in responses}
    assert len(ids) == 8
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1  # they were batched


def hold_engine(live: LiveServer):
    """Make every denoising step wait on an event: the engine is 'busy' until released."""
    release = threading.Event()
    transformer = live.ctx.model.pipeline.transformer
    original = transformer.forward

    def slow_forward(*args, **kwargs):
        release.wait(60)
        return original(*args, **kwargs)

    transformer.forward = slow_forward
    return release, lambda: setattr(transformer, "forward", original)


def test_batched_images_equal_solo_images(server):
    live = server(max_batch_size=4)
    bodies = [{"prompt": p, "seed": s, "num_inference_steps": 3, "add_overlay": False}
              for p, s in (("a red fox in snow", 11), ("a lighthouse at dusk", 12),
                           ("a bowl of ramen", 13))]
    release, restore = hold_engine(live)
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(post, live.url, {"prompt": "blocker", "num_inference_steps": 2})
        wait_until(lambda: live.ctx.scheduler.stats().running_batch_size == 1, 30, "the blocker to run")
        batched = [pool.submit(post, live.url, b) for b in bodies]
        wait_until(lambda: live.ctx.scheduler.stats().queue_length == 3, 30, "three queued jobs")
        release.set()
        batched = [f.result() for f in batched]
        assert blocker.result().status_code == 200
    restore()
    assert [r.headers["X-Batch-Size"] for r in batched] == ["3", "3", "3"]
    solo = [post(live.url, b) for b in bodies]
    assert [r.headers["X-Batch-Size"] for r in solo] == ["1", "1", "1"]
    for one, alone in zip(batched, solo):
        a = Image.open(io.BytesIO(one.content)).convert("RGB")
        b = Image.open(io.BytesIO(alone.content)).convert("RGB")
        worst = max(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes()))
        # fp32 matmuls of a different batch shape may round differently; never visibly.
        assert worst <= 1, f"batched image differs from solo by {worst} levels"


def test_disconnect_while_queued_frees_the_slot_and_never_runs(server):
    live = server(max_queue=1)
    release, restore = hold_engine(live)
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, live.url, {"prompt": "blocker", "num_inference_steps": 2})
        wait_until(lambda: live.ctx.scheduler.stats().running_batch_size == 1, 30, "the blocker to run")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            post(live.url, {"prompt": "impatient", "num_inference_steps": 2}, timeout=1.0)
        wait_until(lambda: live.ctx.scheduler.stats().cancelled == 1, 30, "the job to be cancelled")
        assert live.ctx.scheduler.stats().queue_length == 0
        follow_up = pool.submit(post, live.url, {"prompt": "next", "num_inference_steps": 2})
        wait_until(lambda: live.ctx.scheduler.stats().queue_length == 1, 30, "the next job to queue")
        release.set()
        assert blocker.result().status_code == 200 and follow_up.result().status_code == 200
    restore()
    stats = live.ctx.scheduler.stats()
    assert stats.processed == 2 and stats.batches == 2  # the impatient job never ran


def test_overload_gives_429_with_retry_after_and_answers_everyone(server):
    live = server(max_queue=2)
    release, restore = hold_engine(live)
    with ThreadPoolExecutor(10) as pool:
        first = pool.submit(post, live.url, {"prompt": "first", "num_inference_steps": 2})
        wait_until(lambda: live.ctx.scheduler.stats().running_batch_size == 1, 30, "the first job to run")
        rest = [pool.submit(post, live.url, {"prompt": f"p{i}", "num_inference_steps": 2}) for i in range(9)]
        wait_until(lambda: live.ctx.scheduler.stats().rejected == 7, 30, "seven rejections")
        release.set()
        responses = [first.result()] + [f.result() for f in rest]
    restore()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [429] * 7
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "queue_full"


def test_pipeline_exception_is_a_500_and_the_next_request_succeeds(server, monkeypatch):
    live = server()
    transformer = live.ctx.model.pipeline.transformer

    def evil_forward(*args, **kwargs):
        raise RuntimeError("injected fault in forward")

    monkeypatch.setattr(transformer, "forward", evil_forward)
    r = post(live.url, {"prompt": "x", "num_inference_steps": 2})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "inference_error" and "injected" not in error["message"]
    assert "Traceback" not in r.text
    monkeypatch.undo()
    assert post(live.url, {"prompt": "x", "num_inference_steps": 2}).status_code == 200
    assert live.ctx.scheduler.stats().failed == 1


def test_out_of_memory_retries_alone_then_503(server, monkeypatch):
    live = server()
    transformer = live.ctx.model.pipeline.transformer
    calls = []

    def oom_forward(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformer, "forward", oom_forward)
    r = post(live.url, {"prompt": "x", "num_inference_steps": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "out_of_memory"
    monkeypatch.undo()
    assert client_ok(live)


def client_ok(live: LiveServer) -> bool:
    return post(live.url, {"prompt": "x", "num_inference_steps": 2}).status_code == 200


def test_cuda_failure_marks_the_engine_dead_and_stops_the_server(server, monkeypatch):
    live = server()
    transformer = live.ctx.model.pipeline.transformer

    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(transformer, "forward", broken_forward)
    r = post(live.url, {"prompt": "x", "num_inference_steps": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
    assert live.ctx.lifecycle.exit_code == 1  # the process manager will start a fresh worker
    live.thread.join(30)
    assert not live.thread.is_alive(), "the server should stop so it can be restarted"
