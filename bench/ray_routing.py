#!/usr/bin/env python3
"""Latency of an uneven request stream on two Ray nodes: Ray's routing (same node first) vs
the server's (least loaded replica on any node).

A two-node cluster on this machine (bench/ray_cluster.py: head + joining raylet, token auth,
one replica of the tiny model per node), deployed with `serve deploy serve_config.yaml`. The
stream is open-loop (requests do not wait for each other): one every `--gap` single-image
times, `--share` of them through the head's proxy and the rest through the other node's, as
behind a load balancer that favours one node. Each routing policy gets the same stream, on the
same cluster, in one run; the figure is the ratio of their p95 latencies.

    .venv/bin/python bench/ray_routing.py [--requests 30] [--share 0.8] [--gap 0.6] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ray_cluster import TwoNodeCluster, tiny_config  # noqa: E402
from qwen_image_server.ray_serve import DEPLOYMENT_NAME  # noqa: E402

POLICIES = {
    # Ray Serve's default router; before, the server's router applied the same locality first.
    "same node first (Ray's default)": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    # The deployment's own router, as serve_config.yaml deploys it.
    "least loaded on any node (this server)": None,
}
BODY = {"prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": 2,
        "add_overlay": False}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def single_image_s(url: str, n: int = 3) -> float:
    with httpx.Client(base_url=url, timeout=300) as client:
        times = []
        for seed in range(n):
            start = time.perf_counter()
            client.post("/generate", json={**BODY, "seed": seed}).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


async def stream(urls: list[str], requests: int, share: float, gap_s: float) -> dict[str, object]:
    """Send `requests` images, one every `gap_s` s, the first `share` of every ten through urls[0]."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> tuple[float, str]:
            await asyncio.sleep(i * gap_s)
            url = urls[0] if (i % 10) < round(share * 10) else urls[1]
            start = time.perf_counter()
            answer = await client.post(f"{url}/generate", json={**BODY, "seed": i})
            answer.raise_for_status()
            return time.perf_counter() - start, answer.headers["x-replica"]

        results = await asyncio.gather(*(one(i) for i in range(requests)))
    latencies = [latency for latency, _ in results]
    per_replica: dict[str, int] = {}
    for _, replica in results:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    return {"p50_s": statistics.median(latencies), "p95_s": p95(latencies), "max_s": max(latencies),
            "per_replica": sorted(per_replica.values(), reverse=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--share", type=float, default=0.8, help="share of requests through the head's proxy")
    parser.add_argument("--gap", type=float, default=0.6, help="time between requests, in single-image times")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ray-routing-"))
    env = {"QWEN_IMAGE_RAY_REPLICAS": "2", "QWEN_IMAGE_THREADS": "1", "QWEN_IMAGE_MAX_BATCH_SIZE": "1",
           "QWEN_IMAGE_LOG_LEVEL": "warning", "QWEN_IMAGE_OUTPUT_DIR": str(folder / "out")}
    results: dict[str, dict[str, object]] = {}
    with TwoNodeCluster(folder, env=env) as cluster:
        for policy, router in POLICIES.items():
            config = tiny_config(cluster.proxy_ports[0])
            if router:
                config["applications"][0]["deployments"] = [
                    {"name": DEPLOYMENT_NAME, "request_router_config": {"request_router_class": router}}]
            cluster.deploy(config)
            assert len(set(cluster.replica_nodes().values())) == 2, "one replica per node"
            one = single_image_s(cluster.proxy_urls[0])
            results[policy] = {"single_image_s": one, **asyncio.run(
                stream(cluster.proxy_urls, args.requests, args.share, args.gap * one))}
            cluster.serve("shutdown", "-y")
            print(f"{policy}: {json.dumps(results[policy])}", flush=True)
    if cluster.left_behind:
        print(f"warning: Ray processes were left behind (killed): {cluster.left_behind}", file=sys.stderr)

    before, after = (results[policy] for policy in POLICIES)
    print(f"\n{args.requests} requests, {args.share:.0%} through one node's proxy, one every "
          f"{args.gap:g} single-image times; two nodes, one replica each")
    print(f"{'routing':42} {'p50 s':>7} {'p95 s':>7} {'max s':>7}  requests per replica")
    for policy, r in results.items():
        print(f"{policy:42} {r['p50_s']:7.2f} {r['p95_s']:7.2f} {r['max_s']:7.2f}  {r['per_replica']}")
    ratio = float(before["p95_s"]) / float(after["p95_s"])  # type: ignore[arg-type]
    print(f"p95 latency: {ratio:.1f}x lower with the server's routing")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "p95_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
