#!/usr/bin/env python3
"""Scheduler benchmark: server overhead, batching gain, and /health latency under load.

Prints, from one run on this machine (any model: QWEN_IMAGE_MODEL etc. as for the server):
  (a) server end-to-end time / raw pipeline time for one s1:1 request      (goal <= 1.03)
  (b) 8 concurrent same-shape requests vs 8 sequential raw pipeline calls (throughput ratio)
  (c) /health p50 / p99 latency idle, and while the engine makes one large (1:1, 1328x1328) image,
      with the ratio busy / idle                                             (goal p99 <= 20 ms)

    .venv/bin/python bench/scheduler_bench.py [--steps 20] [--requests 8] [--json out.json]
    .venv/bin/python bench/scheduler_bench.py --health-only --steps 4   # (c) alone, a minute on a CPU

tests/test_process.py checks (c) with a bound loose enough for any CI machine; the figure is here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_image_server.api.app import create_app
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.runner import PipelineEngine
from qwen_image_server.launch.http import GracefulServer, find_fastapi
from qwen_image_server.protocol.native import GenerateRequest
from qwen_image_server.serving.model_registry import ANY_MODEL
from qwen_image_server.serving.specs import build_specs


def serve(settings: Settings) -> tuple[GracefulServer, threading.Thread, str]:
    return serve_app(create_app(settings))


def serve_app(app) -> tuple[GracefulServer, threading.Thread, str]:
    """Run `app` on a free port in a thread; return once it answers /ready."""
    server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/ready").status_code != 200:
        time.sleep(0.2)
    return server, thread, url


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--busy-aspect-ratio", default="1:1", help="the image made while (c) probes /health")
    parser.add_argument("--health-only", action="store_true", help="measure (c) only")
    args = parser.parse_args()

    settings = Settings(log_level="warning", output_dir=Path("bench/results/tmp"))
    server, thread, url = serve(settings)
    ctx = find_fastapi(server.config.loaded_app).state.ctx
    engine: PipelineEngine = ctx.scheduler.engine
    body = {"prompt": "A cute cat sitting on a windowsill", "aspect_ratio": "s1:1",
            "num_inference_steps": args.steps}
    spec = build_specs(GenerateRequest(**body), model=ANY_MODEL, loras=(), seeds=[42])[0]
    client = httpx.Client(base_url=url, timeout=3600)

    def raw_once() -> float:
        start = time.perf_counter()
        engine.run_batch([spec], lambda event: None)
        return time.perf_counter() - start

    server_inference: list[float] = []

    def http_once(b: dict) -> float:
        start = time.perf_counter()
        r = client.post("/generate", json=b)
        r.raise_for_status()
        server_inference.append(float(r.headers["X-Inference-Time"]))
        return time.perf_counter() - start

    # Warm-up (first calls allocate, compile kernels, fill caches). The raw calls below run on
    # this thread while the server is idle: the engine thread is parked waiting for work.
    http_once(body)
    raw_once()
    result: dict = {"device": ctx.device.label, "model": settings.model, "steps": args.steps}
    n = args.requests
    if not args.health_only:
        raw, e2e = [], []
        for _ in range(args.repeats):  # interleaved so drift affects both alike
            raw.append(raw_once())
            e2e.append(http_once(body))
        raw_med, e2e_med = statistics.median(raw), statistics.median(e2e)
        # What the server adds around its own pipeline call (queue hand-off, overlay, PNG, HTTP).
        overhead = statistics.median(t - i for t, i in zip(e2e, server_inference[1:], strict=False))

        seq_raw = sum(raw_once() for _ in range(n))
        bodies = [{**body, "seed": 100 + i, "prompt": f"{body['prompt']} #{i}"} for i in range(n)]
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda b: httpx.post(f"{url}/generate", json=b, timeout=3600).raise_for_status(), bodies))
        concurrent = time.perf_counter() - start
        result.update({
            "a_raw_s": round(raw_med, 4),
            "a_e2e_s": round(e2e_med, 4),
            "a_ratio": round(e2e_med / raw_med, 4),
            "a_overhead_s": round(overhead, 4),
            "b_requests": n,
            "b_sequential_raw_s": round(seq_raw, 3),
            "b_concurrent_server_s": round(concurrent, 3),
            "b_speedup": round(seq_raw / concurrent, 3),
        })

    idle: list[float] = []
    with httpx.Client(base_url=url) as probe:
        for _ in range(200):
            start = time.perf_counter()
            probe.get("/health").raise_for_status()
            idle.append((time.perf_counter() - start) * 1000)
    latencies: list[float] = []
    busy = threading.Thread(target=lambda: httpx.post(
        f"{url}/generate", json={**body, "aspect_ratio": args.busy_aspect_ratio}, timeout=3600))
    busy.start()
    while ctx.scheduler.stats().running_batch_size == 0:
        time.sleep(0.005)
    with httpx.Client(base_url=url) as probe:
        while busy.is_alive() and ctx.scheduler.stats().running_batch_size:
            start = time.perf_counter()
            probe.get("/health").raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    busy.join()

    busy_p50 = percentile(latencies, 0.5) if latencies else None
    idle_p50 = percentile(idle, 0.5)
    result.update({
        "c_busy_aspect_ratio": args.busy_aspect_ratio,
        "c_health_idle_p50_ms": round(idle_p50, 2),
        "c_health_samples": len(latencies),
        "c_health_p50_ms": round(busy_p50, 2) if busy_p50 is not None else None,
        "c_health_p99_ms": round(percentile(latencies, 0.99), 2) if latencies else None,
        "c_health_busy_over_idle": round(busy_p50 / idle_p50, 2) if busy_p50 is not None else None,
    })
    print(f"device: {result['device']}, model: {settings.model}, s1:1, {args.steps} steps")
    if not args.health_only:
        print(f"(a) one request: raw pipeline {raw_med:.3f}s, server e2e {e2e_med:.3f}s, "
              f"ratio {result['a_ratio']:.3f} (goal <= 1.03); outside the pipeline call: {overhead * 1000:.0f} ms")
        print(f"(b) {n} requests: sequential raw {seq_raw:.2f}s, concurrent via server {concurrent:.2f}s, "
              f"speedup {result['b_speedup']:.2f}x")
    print(f"(c) /health idle: p50 {result['c_health_idle_p50_ms']} ms; while a {args.busy_aspect_ratio} image "
          f"generates: p50 {result['c_health_p50_ms']} ms, p99 {result['c_health_p99_ms']} ms over "
          f"{len(latencies)} requests, p50 ratio busy/idle {result['c_health_busy_over_idle']} "
          "(goal p99 <= 20 ms)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    server.should_exit = True
    thread.join(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
