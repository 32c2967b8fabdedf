#!/usr/bin/env python3
"""Basic API test client (the seed's test_client.py): health, info, and both output modes.

    python examples/test_client.py [--url http://localhost:5000] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:5000", help="server address")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--out", default="test_output.png", help="where to write the returned PNG")
    args = parser.parse_args()

    with httpx.Client(base_url=args.url, timeout=600) as client:
        health = client.get("/health")
        print(f"GET /health -> {health.status_code} {health.json()}")
        if health.status_code != 200:
            return 1
        info = client.get("/info").json()
        print(f"GET /info   -> model {info['model_name']} on {info['device']} ({info['gpu'] or 'CPU'}), "
              f"{info['total_parameters']:,} parameters, ratios {', '.join(info['supported_aspect_ratios'])}")

        body = {"prompt": "A cute cat sitting on a windowsill", "aspect_ratio": "s1:1",
                "num_inference_steps": args.steps, "seed": 42}
        start = time.perf_counter()
        r = client.post("/generate", json=body)
        if r.status_code != 200:
            print(f"POST /generate -> {r.status_code} {r.text}")
            return 1
        with open(args.out, "wb") as fh:
            fh.write(r.content)
        print(f"POST /generate (bytes) -> {len(r.content):,} bytes of {r.headers['content-type']} "
              f"in {time.perf_counter() - start:.2f}s (inference {r.headers['X-Inference-Time']}s, "
              f"request {r.headers['X-Request-ID']}) -> {args.out}")

        r = client.post("/generate", json={**body, "aspect_ratio": "16:9", "save_to_file": True})
        if r.status_code != 200:
            print(f"POST /generate (save_to_file) -> {r.status_code} {r.text}")
            return 1
        saved = r.json()
        print(f"POST /generate (save_to_file) -> {saved['file_path']} "
              f"{saved['width']}x{saved['height']} in {saved['inference_time']}s")
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
