#!/usr/bin/env python3
"""Latency of an uneven request stream on two Ray nodes: Ray's routing (same node first) vs
the server's (least loaded replica on any node, `ReplicaAffinityRouter`).

A two-node cluster on this machine (bench/ray_cluster.py: head + joining raylet, token auth,
one replica per node) and the real Ray proxies and routers. The stream is open-loop (requests
do not wait for each other): one every `--gap` image times, `--share` of them through the
head's proxy and the rest through the other node's, as behind a load balancer that favours one
node. Both routings get the same stream on the same cluster in one run; the figure is the
ratio of their p95 latencies.

What a replica does per request (`--work`):
  wait  a stand-in replica whose image takes a fixed `--image-s` wait, one image at a time, and
        which reports its backlog to the router as the server does: work like a GPU's, which
        uses no host CPU. Two nodes on one machine share its cores, so only this shows what
        two machines would (default).
  tiny  the server itself (serve_config.yaml with the tiny model, as tests/test_ray_cluster.py
        deploys it). Meaningful where each replica has cores of its own (a core per replica,
        nothing else running); on a busy machine both replicas share the same cores.

    .venv/bin/python bench/ray_routing.py [--work wait|tiny] [--requests 40] [--share 0.8] [--gap 0.6] [--json out.json]
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
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from bench.ray_cluster import TwoNodeCluster, tiny_config  # noqa: E402
from qwen_image_server.api.replica import REPLICA_HEADER  # noqa: E402
from qwen_image_server.launch.ray_app import DEPLOYMENT_NAME, ROUTING_STATS_PERIOD_S  # noqa: E402
from qwen_image_server.launch.ray_router import BACKLOG_STAT, ReplicaAffinityRouter  # noqa: E402

POLICIES = {
    # Ray Serve's default router; the server's router used to apply the same locality first.
    "same node first (Ray's default)": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    # The deployment's own router.
    "least loaded on any node (this server)": None,
}
BODY = {"prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": 2,
        "add_overlay": False}
MAX_ONGOING = 33  # the server's default: its queue (32) and a batch of one


@serve.deployment(
    name=DEPLOYMENT_NAME, num_replicas=2, max_ongoing_requests=MAX_ONGOING,
    request_router_config=RequestRouterConfig(request_router_class=ReplicaAffinityRouter,
                                              request_routing_stats_period_s=ROUTING_STATS_PERIOD_S))
class StandInReplica:
    """One image at a time, each a fixed wait; its backlog reported as the server's replica does."""

    def __init__(self, image_s: float) -> None:
        self.image_s = image_s
        self.one_at_a_time = asyncio.Lock()
        self.backlog = 0
        self.name = serve.get_replica_context().replica_tag

    async def __call__(self, request: Request) -> Response:
        self.backlog += 1
        try:
            async with self.one_at_a_time:
                await asyncio.sleep(self.image_s)
        finally:
            self.backlog -= 1
        return Response(b"", headers={REPLICA_HEADER: self.name})

    async def record_routing_stats(self) -> dict[str, int]:
        return {BACKLOG_STAT: self.backlog}


def stand_in_app(args: dict[str, Any]) -> Any:
    """`import_path` of the stand-in application."""
    return StandInReplica.bind(float(args["image_s"]))


def stand_in_config(proxy_port: int, image_s: float) -> dict[str, Any]:
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": proxy_port},
            "applications": [{"name": "qwen-image", "route_prefix": "/", "args": {"image_s": image_s},
                              "import_path": "bench.ray_routing:stand_in_app"}]}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def image_time_s(url: str, n: int = 3) -> float:
    with httpx.Client(base_url=url, timeout=300) as client:
        times = []
        for seed in range(n):
            start = time.perf_counter()
            client.post("/generate", json={**BODY, "seed": seed}).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


async def stream(urls: list[str], requests: int, share: float, gap_s: float) -> dict[str, Any]:
    """Send `requests` images, one every `gap_s` s, the first `share` of every ten through urls[0]."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> tuple[float, int, str]:
            await asyncio.sleep(i * gap_s)
            proxy = 0 if (i % 10) < round(share * 10) else 1
            start = time.perf_counter()
            answer = await client.post(f"{urls[proxy]}/generate", json={**BODY, "seed": i})
            answer.raise_for_status()
            return time.perf_counter() - start, proxy, answer.headers[REPLICA_HEADER]

        results = await asyncio.gather(*(one(i) for i in range(requests)))
    latencies = [latency for latency, _, _ in results]
    replicas = sorted({replica for _, _, replica in results})
    # Requests each proxy sent to each replica, the busiest replica first.
    split = [[sum(1 for _, p, r in results if p == proxy and r == replica) for replica in replicas]
             for proxy in (0, 1)]
    order = sorted(range(len(replicas)), key=lambda k: -(split[0][k] + split[1][k]))
    return {"p50_s": statistics.median(latencies), "p95_s": p95(latencies), "max_s": max(latencies),
            "per_replica": [split[0][k] + split[1][k] for k in order],
            "per_proxy_and_replica": [[row[k] for k in order] for row in split]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", choices=("wait", "tiny"), default="wait")
    parser.add_argument("--image-s", type=float, default=1.0, help="--work wait: one image's time")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--share", type=float, default=0.8, help="share of requests through the head's proxy")
    parser.add_argument("--gap", type=float, default=0.6, help="time between requests, in image times")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ray-routing-"))
    env = {"PYTHONPATH": str(ROOT),  # the stand-in replica's module, on every node
           "QWEN_IMAGE_RAY_REPLICAS": "2", "QWEN_IMAGE_THREADS": "1", "QWEN_IMAGE_MAX_BATCH_SIZE": "1",
           "QWEN_IMAGE_LOG_LEVEL": "warning", "QWEN_IMAGE_OUTPUT_DIR": str(folder / "out")}
    results: dict[str, dict[str, Any]] = {}
    with TwoNodeCluster(folder, env=env) as cluster:
        for policy, router in POLICIES.items():
            config = (stand_in_config(cluster.proxy_ports[0], args.image_s) if args.work == "wait"
                      else tiny_config(cluster.proxy_ports[0]))
            if router:
                config["applications"][0]["deployments"] = [
                    {"name": DEPLOYMENT_NAME, "request_router_config": {"request_router_class": router}}]
            cluster.deploy(config)
            assert len(set(cluster.replica_nodes().values())) == 2, "one replica per node"
            image_s = image_time_s(cluster.proxy_urls[0])
            results[policy] = {"image_s": image_s, **asyncio.run(
                stream(cluster.proxy_urls, args.requests, args.share, args.gap * image_s))}
            cluster.serve("shutdown", "-y")
            print(f"{policy}: {json.dumps(results[policy])}", flush=True)
    if cluster.left_behind:
        print(f"warning: Ray processes were left behind (killed): {cluster.left_behind}", file=sys.stderr)

    before, after = (results[policy] for policy in POLICIES)
    print(f"\n{args.requests} requests ({args.work}), {args.share:.0%} through one node's proxy, one every "
          f"{args.gap:g} image times; two nodes, one replica each")
    print(f"{'routing':42} {'p50 s':>7} {'p95 s':>7} {'max s':>7}  per replica  per proxy, replica")
    for policy, r in results.items():
        print(f"{policy:42} {r['p50_s']:7.2f} {r['p95_s']:7.2f} {r['max_s']:7.2f}  "
              f"{r['per_replica']!s:11}  {r['per_proxy_and_replica']}")
    ratio = before["p95_s"] / after["p95_s"]
    print(f"p95 latency: {ratio:.1f}x lower with the server's routing (the nodes' logs: {folder})")
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)},
                                         "results": results, "p95_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
