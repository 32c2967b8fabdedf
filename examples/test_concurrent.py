#!/usr/bin/env python3
"""Concurrent request test (the seed's test_concurrent.py): N requests one after another,
then the same N at once, and the comparison.

    python examples/test_concurrent.py [--url http://localhost:5000] [-n 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def generate(client: httpx.Client, i: int, args: argparse.Namespace) -> tuple[int, float, str]:
    start = time.perf_counter()
    r = client.post("/generate", json={
        "prompt": f"A beautiful sunset over mountains, variation {i}",
        "aspect_ratio": args.aspect_ratio, "num_inference_steps": args.steps, "seed": 1000 + i,
    })
    return r.status_code, time.perf_counter() - start, r.headers.get("X-Batch-Size", "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:5000")
    parser.add_argument("-n", "--requests", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--aspect-ratio", default="s1:1")
    args = parser.parse_args()
    n = args.requests

    with httpx.Client(base_url=args.url, timeout=900, limits=httpx.Limits(max_connections=n)) as client:
        print(f"Sequential: {n} requests, one after another")
        start = time.perf_counter()
        sequential = [generate(client, i, args) for i in range(n)]
        seq_time = time.perf_counter() - start
        for i, (status, took, batch) in enumerate(sequential):
            print(f"  request {i}: {status} in {took:.2f}s (batch of {batch})")

        print(f"Concurrent: {n} requests at once")
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            concurrent = list(pool.map(lambda i: generate(client, i, args), range(n)))
        con_time = time.perf_counter() - start
        for i, (status, took, batch) in enumerate(concurrent):
            print(f"  request {i}: {status} in {took:.2f}s (batch of {batch})")

    ok = all(status == 200 for status, _, _ in sequential + concurrent)
    print()
    print(f"Sequential total: {seq_time:.2f}s ({seq_time / n:.2f}s per image)")
    print(f"Concurrent total: {con_time:.2f}s ({con_time / n:.2f}s per image)")
    print(f"Speedup from concurrency (batching): {seq_time / con_time:.2f}x")
    print("all requests succeeded" if ok else "some requests failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
