"""GET /metrics as Prometheus scrapes it: HTTP traffic by route template, the scheduler's numbers,
and job outcomes (the front's numbers over every engine: tests/test_engine_process.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import hold_engine, open_request, wait_until
from tests.test_concurrency import post

FAST = {"num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}

Samples = dict[tuple[str, frozenset], float]


def scrape(client: httpx.Client) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; a series the server does not export fails the test
    (the server creates its label series up front, so a 0 is a real 0)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        exported = sorted({f"{n}{dict(ls)}" for n, ls in samples if n == name}) or "none of that name"
        raise AssertionError(f"/metrics has no sample {name}{labels}; it has {exported}")
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include these (e.g. over worker pids)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_requests_are_counted_by_route_template_and_status(server):
    live = server()
    with live.client() as c:
        for _ in range(3):
            assert c.get("/health").status_code == 200
        assert c.get("/no/such/page").status_code == 404
        assert c.get("/files/Qwen-Image-20240101_000000-req7.png").status_code == 404
        assert c.post("/generate", json={"prompt": "a cat", **FAST}).status_code == 200
        assert c.post("/generate", json={"prompt": ""}).status_code == 400
        m = scrape(c)
    requests = "qwen_image_http_requests_total"
    assert value(m, requests, method="GET", route="/health", status="200") == 3
    assert value(m, requests, method="GET", route="unmatched", status="404") == 1
    assert value(m, requests, method="GET", route="/files/{name}", status="404") == 1
    assert value(m, requests, method="POST", route="/generate", status="200") == 1
    assert value(m, requests, method="POST", route="/generate", status="400") == 1
    assert value(m, "qwen_image_http_request_duration_seconds_count", method="GET", route="/health") == 3
    routes = {dict(labels).get("route") for (_, labels) in m}
    assert not {"/no/such/page", "/files/Qwen-Image-20240101_000000-req7.png"} & routes  # never raw paths


def test_generation_feeds_queue_batch_step_and_image_metrics(server):
    live = server()
    with live.client() as c:
        assert c.post("/generate", json={"prompt": "a dog", **FAST, "num_inference_steps": 3}).status_code == 200
        wait_until(lambda: value(scrape(c), "qwen_image_images_generated_total") == 1, 10, "the image to be counted")
        m = scrape(c)
        text = c.get("/metrics").text
        openmetrics = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        load_time = c.get("/info").json()["model_load_time"]
    assert value(m, "qwen_image_batch_size_count") == 1 and value(m, "qwen_image_batch_size_sum") == 1
    assert value(m, "qwen_image_batch_inference_seconds_count") == 1
    assert value(m, "qwen_image_batch_inference_seconds_sum") > 0
    assert value(m, "qwen_image_queue_wait_seconds_count") == 1
    assert value(m, "qwen_image_denoising_step_seconds_count") == 2  # steps 2 and 3: step 1 also encodes
    assert value(m, "qwen_image_queue_size") == 0
    # Latency by size and steps: 512x512 is 0.25 megapixels, 3 steps fall in the "up to 4" class.
    assert value(m, "qwen_image_job_duration_seconds_count", megapixels="0.25", steps="4") == 1
    assert value(m, "qwen_image_job_duration_seconds_sum", megapixels="0.25", steps="4") > 0
    assert value(m, "qwen_image_model_load_seconds") == pytest.approx(load_time, abs=0.01)
    assert value(m, "qwen_image_gpu_memory_allocated_bytes") == 0  # CPU
    for name in ("qwen_image_queue_wait_seconds", "qwen_image_batch_inference_seconds",
                 "qwen_image_denoising_step_seconds"):
        assert f'{name}_bucket{{le="0.01"}}' in text and f'{name}_bucket{{le="600.0"}}' in text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_rejections_cancellations_and_failures_are_counted(server):
    live = server(max_queue=1)
    c = live.client()
    with ThreadPoolExecutor(1) as pool, hold_engine(live) as hook:
        blocker = pool.submit(post, live.url, {"prompt": "blocker", **FAST})
        live.wait_running(what="the blocker to run")
        impatient = open_request(live.url, "/generate", {"prompt": "impatient", **FAST})
        wait_until(lambda: value(scrape(c), "qwen_image_queue_size") == 1, 30, "a queued job")
        full = post(live.url, {"prompt": "one too many", **FAST})
        assert full.status_code == 429 and full.json()["error"]["type"] == "queue_full"
        assert int(full.headers["Retry-After"]) >= 1
        impatient.close()  # the client gives up and disconnects
        wait_until(lambda: value(scrape(c), "qwen_image_jobs_cancelled_total") == 1, 30, "the cancellation")
        assert value(scrape(c), "qwen_image_queue_size") == 0
        hook.release()
        assert blocker.result().status_code == 200

    live.hook.fail_next(RuntimeError("injected fault"))
    assert post(live.url, {"prompt": "doomed", **FAST}).status_code == 500
    wait_until(lambda: value(scrape(c), "qwen_image_jobs_failed_total", type="inference_error") == 1,
               10, "the failure to be counted")
    m = scrape(c)
    c.close()
    assert value(m, "qwen_image_jobs_rejected_total", reason="queue_full") == 1
    assert value(m, "qwen_image_jobs_rejected_total", reason="shutting_down") == 0
    assert value(m, "qwen_image_images_generated_total") == 1
    assert value(m, "qwen_image_http_requests_total", method="POST", route="/generate", status="429") == 1
    assert value(m, "qwen_image_http_requests_total", method="POST", route="/generate", status="500") == 1
