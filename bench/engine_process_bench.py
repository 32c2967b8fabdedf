#!/usr/bin/env python3
"""What the process boundary costs: engine processes against the in-process engine.

Prints, from one run on this machine:
  (a) end-to-end /generate time through an engine process / through the in-process engine, same
      model, same request (tiny model, 512x512 by default; medians of alternating rounds)
                                                                            (goal <= 1.03)
      and what the boundary itself costs per call, measured without the model's noise: a fake
      engine that answers at once with an image of that size, called in this process and
      through an engine process (the difference of the medians), with the ratio it implies
  (b) the front's CPU seconds per image while eight fake engine processes (instant images of the
      requested size, crossing the pipe like real ones) are kept busy: what one front process
      spends per image on HTTP, the queue, the pipe and the PNG encoding, so that it can feed
      eight GPUs.

    .venv/bin/python bench/engine_process_bench.py [--rounds 8] [--steps 4] [--size s1:1]
    .venv/bin/python bench/engine_process_bench.py --front-only --images 64 --size 1:1
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler_bench import serve_app as serve  # noqa: E402

from qwen_image_server.api.app import create_app, real_engine_factory  # noqa: E402
from qwen_image_server.config.settings import Settings  # noqa: E402
from qwen_image_server.engine.process import engine_factories  # noqa: E402
from qwen_image_server.launch.http import GracefulServer  # noqa: E402


class FakeLoader:
    """Engine processes' loader for (b): an engine that answers at once with a picture of the
    requested size (a smooth gradient with a little noise, so the PNG encoder works as on a real
    image rather than on a flat colour)."""

    def __call__(self, settings: Settings):
        return _FastEngine()


class _FastEngine:
    def run_batch(self, specs, on_step):
        import numpy as np
        from PIL import Image

        from qwen_image_server.engine.types import StepEvent

        total = specs[0].num_inference_steps
        for step in range(1, total + 1):
            on_step(StepEvent(step, total))
        images = []
        for spec in specs:
            rng = np.random.default_rng(spec.seed)
            y, x = np.mgrid[0:spec.height, 0:spec.width]
            base = np.stack([x * 255 // spec.width, y * 255 // spec.height,
                             (x + y) * 127 // (spec.width + spec.height)], -1)
            pixels = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype("uint8")
            images.append(Image.fromarray(pixels, "RGB"))
        return images

    def free_memory(self) -> None:
        pass


def stop(server: GracefulServer, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(60)


def end_to_end(args: argparse.Namespace) -> dict:
    settings = Settings(_env_file=None, log_level="warning", max_batch_size=1)
    in_process = serve(create_app(settings, engine_factory=real_engine_factory(settings)))
    process = serve(create_app(settings))  # WORKERS=1: one engine process
    body = {"prompt": "a lighthouse at dusk", "num_inference_steps": args.steps,
            "aspect_ratio": args.size, "add_overlay": False}
    times: dict[str, list[float]] = {"in_process": [], "engine_process": []}
    try:
        for url in (in_process[2], process[2]):  # warm both (first call allocates)
            httpx.post(f"{url}/generate", json=body, timeout=600).raise_for_status()
        for i in range(args.rounds):
            order = [("in_process", in_process[2]), ("engine_process", process[2])]
            for name, url in order if i % 2 == 0 else order[::-1]:  # alternate: drift hits both
                start = time.perf_counter()
                httpx.post(f"{url}/generate", json={**body, "seed": i}, timeout=600).raise_for_status()
                times[name].append(time.perf_counter() - start)
    finally:
        stop(*process[:2])
        stop(*in_process[:2])
    medians = {name: statistics.median(values) for name, values in times.items()}
    boundary = boundary_cost(settings, args)
    return {"size": args.size, "steps": args.steps, "rounds": args.rounds,
            "median_s": {k: round(v, 4) for k, v in medians.items()},
            "ratio": round(medians["engine_process"] / medians["in_process"], 4),
            "boundary_ms": round(boundary * 1000, 2),
            "implied_ratio": round((medians["in_process"] + boundary) / medians["in_process"], 4)}


def boundary_cost(settings: Settings, args: argparse.Namespace, calls: int = 30) -> float:
    """Seconds one run_batch call spends crossing the process boundary (spec out, step events
    and the image back), from a fake engine called here and in an engine process."""
    from qwen_image_server.config.presets import ASPECT_RATIOS
    from qwen_image_server.engine.process import EngineProcess
    from qwen_image_server.engine.types import GenerationSpec

    width, height = ASPECT_RATIOS[args.size]
    local, remote = _FastEngine(), EngineProcess(settings, 0, None, FakeLoader())
    times: dict[str, list[float]] = {"local": [], "remote": []}
    try:
        for i in range(calls):
            spec = [GenerationSpec("a lighthouse", " ", width, height, args.steps, 4.0, i)]
            for name, engine in (("local", local), ("remote", remote)):
                start = time.perf_counter()
                engine.run_batch(spec, lambda *a, **k: None)
                times[name].append(time.perf_counter() - start)
    finally:
        remote.close()
    return statistics.median(times["remote"]) - statistics.median(times["local"])


def front_cpu(args: argparse.Namespace) -> dict:
    settings = Settings(_env_file=None, log_level="warning", workers=8, max_batch_size=1,
                        max_queue=max(32, args.images), threads=4)
    app = create_app(settings, engines=engine_factories(settings, [None] * 8, FakeLoader()))
    server, thread, url = serve(app)
    body = {"prompt": "a lighthouse at dusk", "num_inference_steps": args.steps,
            "aspect_ratio": args.size, "add_overlay": False}
    try:
        httpx.post(f"{url}/generate", json=body, timeout=600).raise_for_status()
        # The clients run in this process too; their share is measured alone and taken off.
        with httpx.Client(timeout=600) as c:
            start_cpu, start = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                sizes = list(pool.map(lambda i: len(c.post(f"{url}/generate", json={**body, "seed": i}).content),
                                      range(args.images)))
            cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
        client_cpu = client_share(sizes)
    finally:
        stop(server, thread)
    per_image = (cpu - client_cpu) / args.images
    return {"size": args.size, "images": args.images, "engines": 8, "wall_s": round(wall, 2),
            "images_per_s": round(args.images / wall, 2), "mean_png_bytes": int(statistics.mean(sizes)),
            "front_cpu_s_per_image": round(per_image, 4), "client_cpu_s_per_image": round(client_cpu / args.images, 4)}


def client_share(sizes: list[int]) -> float:
    """CPU seconds this process spends as the client: the same requests answered by a bare
    server with bodies of the same sizes."""
    from fastapi import FastAPI, Response

    payloads = {size: b"\0" * size for size in set(sizes)}
    bare = FastAPI()

    @bare.post("/generate")
    def generate(size: int) -> Response:
        return Response(payloads[size], media_type="image/png")

    bare.add_api_route("/ready", lambda: {}, methods=["GET"])
    server, thread, url = serve(bare)
    try:
        with httpx.Client(timeout=600) as c:
            start = time.process_time()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda s: c.post(f"{url}/generate", params={"size": s},
                                               json={"prompt": "a lighthouse at dusk"}), sizes))
            return time.process_time() - start
    finally:
        stop(server, thread)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="s1:1", help="aspect-ratio preset (s1:1 is 512x512)")
    parser.add_argument("--images", type=int, default=64, help="(b): images through eight fake engines")
    parser.add_argument("--front-only", action="store_true", help="(b) alone")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    if not args.front_only:
        results["end_to_end"] = end_to_end(args)
        e = results["end_to_end"]
        print(f"(a) engine process / in-process, {args.size}, {args.steps} steps: {e['ratio']:.3f} "
              f"(medians {e['median_s']}); the boundary itself: {e['boundary_ms']} ms per call, "
              f"ratio {e['implied_ratio']:.4f}")
    results["front"] = front_cpu(args)
    f = results["front"]
    print(f"(b) front CPU per image with 8 fake engines, {args.size}: {f['front_cpu_s_per_image'] * 1000:.1f} ms "
          f"({f['images_per_s']} images/s over {f['images']} images, PNG {f['mean_png_bytes']} bytes)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
