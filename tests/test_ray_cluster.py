"""The Ray cluster of docs/ray.md, for real: two nodes on this machine (a head and a second raylet
joining it, token authentication on, one CPU each), the application deployed with
`serve deploy serve_config.yaml` (adjusted only for the tiny model, its port and no GPUs; the
replica count comes from the nodes' environment), requests through either node's proxy, and a
clean stop.

One cluster for the whole file (`cluster`); the tests run in order, the last one stops it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install .[ray]")

from bench.ray_cluster import TwoNodeCluster, tiny_config
from qwen_image_server.launch.ray_app import choose_cluster
from tests.conftest import ROOT, tiny_settings, wait_until

pytestmark = pytest.mark.slow

REPLICAS = 2
BODY = {"prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": 2,
        "add_overlay": False}
ANSWER_TIMEOUT = 240.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[TwoNodeCluster]:
    folder = tmp_path_factory.mktemp("ray-cluster")
    # Settings the config leaves out come from the nodes' environment, as on real machines.
    env = {"QWEN_IMAGE_RAY_REPLICAS": str(REPLICAS), "QWEN_IMAGE_THREADS": "1",
           "QWEN_IMAGE_MAX_BATCH_SIZE": "1", "QWEN_IMAGE_LOG_LEVEL": "warning",
           "QWEN_IMAGE_OUTPUT_DIR": str(folder / "out")}
    with TwoNodeCluster(folder, env=env) as started:
        started.deploy(tiny_config(started.proxy_ports[0]))
        yield started


def burst(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=ANSWER_TIMEOUT) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    return asyncio.run(send_all())


def seeds(n: int) -> list[dict]:
    return [{**BODY, "seed": seed} for seed in range(n)]


def without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}


def test_the_replicas_run_on_both_nodes(cluster: TwoNodeCluster) -> None:
    nodes = {node["node_id"] for node in cluster.alive_nodes()}
    replicas = cluster.replica_nodes()
    assert len(replicas) == REPLICAS
    assert set(replicas.values()) == nodes and len(nodes) == 2


def test_either_nodes_proxy_serves_images(cluster: TwoNodeCluster) -> None:
    replicas = set(cluster.replica_nodes())
    for url in cluster.proxy_urls:
        with httpx.Client(base_url=url, timeout=ANSWER_TIMEOUT) as client:
            assert client.get("/-/healthz").status_code == 200  # a load balancer's check
            info = client.get("/info")
            assert info.status_code == 200 and info.headers["x-replica"] in replicas
            image = client.post("/generate", json=BODY)
            assert image.status_code == 200 and image.content.startswith(PNG)


def test_a_busy_proxy_spreads_its_requests_over_both_nodes(cluster: TwoNodeCluster) -> None:
    # Everything through the head's proxy: its node's replica alone would queue them all.
    answers = burst(cluster.proxy_urls[0], "/generate", seeds(6))
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.headers["x-replica"] for a in answers} == set(cluster.replica_nodes())


def test_a_job_is_found_through_the_other_nodes_proxy(cluster: TwoNodeCluster) -> None:
    created = burst(cluster.proxy_urls[0], "/v1/jobs", seeds(4))
    assert [r.status_code for r in created] == [202] * 4
    owners = {r.json()["id"]: r.headers["x-replica"] for r in created}
    assert set(owners.values()) == set(cluster.replica_nodes())  # both nodes hold some
    with httpx.Client(base_url=cluster.proxy_urls[1], timeout=ANSWER_TIMEOUT) as client:
        for job_id, owner in owners.items():
            def finished(job_id: str = job_id, owner: str = owner) -> bool:
                status = client.get(f"/v1/jobs/{job_id}")
                assert status.status_code == 200 and status.headers["x-replica"] == owner
                return status.json()["status"] == "succeeded"

            wait_until(finished, ANSWER_TIMEOUT, f"job {job_id}", interval=0.25)
            image = client.get(f"/v1/jobs/{job_id}/image")
            assert image.status_code == 200 and image.content.startswith(PNG)
            assert image.headers["x-replica"] == owner


def test_without_the_token_the_cluster_refuses_and_serve_ray_says_why(cluster: TwoNodeCluster) -> None:
    refused = cluster.serve("status", check=False, env=without_token())
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr

    def serve_ray(**auth: str) -> list[str]:
        joined = subprocess.run(
            [sys.executable, "-m", "qwen_image_server", "serve", "--ray"], cwd=ROOT, timeout=120,
            env={**without_token(), "RAY_ADDRESS": cluster.address, **auth}, capture_output=True, text=True)
        assert joined.returncode == 1 and "Traceback" not in joined.stderr and "gcs_client" not in joined.stderr
        return joined.stderr.strip().splitlines()[-1:]

    assert serve_ray() == [
        f"error: the Ray cluster at {cluster.address} uses token authentication: set RAY_AUTH_MODE=token "
        "and the cluster's token in RAY_AUTH_TOKEN (or the file ~/.ray/auth_token, or a file named "
        "by RAY_AUTH_TOKEN_PATH)"]
    assert serve_ray(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token") == [
        f"error: the Ray cluster at {cluster.address} refused this machine's token: RAY_AUTH_TOKEN "
        "(or ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) must hold the token the cluster was started with"]


def test_serve_ray_finds_the_cluster_started_on_this_machine(cluster: TwoNodeCluster) -> None:
    choice = choose_cluster(tiny_settings(cluster.folder), temp_dir=str(cluster.temp_dir))
    assert (choice.address, choice.joins) == ("auto", True)  # Ray then reads this machine's token too
    assert choice.named_by.startswith("the cluster started on this machine (")
    assert choice.named_by.endswith(f":{cluster.gcs_port})")


def test_serve_ray_with_the_token_joins_and_serves(cluster: TwoNodeCluster) -> None:
    # The docs' foreground way, in place of the deployed config (the nodes' CPUs are taken).
    cluster.serve("shutdown", "-y")
    log = cluster.folder / "serve-ray.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "qwen_image_server", "serve", "--ray", "--ray-replicas", "1",
             "--host", "127.0.0.1", "--port", str(cluster.proxy_ports[0]), "--threads", "1"],
            cwd=cluster.folder, stdout=out, stderr=subprocess.STDOUT,
            env={**cluster.env, "RAY_ADDRESS": cluster.address, "QWEN_IMAGE_LOG_LEVEL": "info"})
    try:
        def serving() -> bool:
            assert server.poll() is None, log.read_text(errors="replace")
            return "serving on http://" in log.read_text(errors="replace")

        wait_until(serving, ANSWER_TIMEOUT, "qwen-image serve --ray to serve", interval=0.5)
        assert "joined the Ray cluster at " in log.read_text() and "(RAY_ADDRESS; 2 node(s)" in log.read_text()
        # (One replica: Ray keeps a proxy on the head and on nodes with replicas only.)
        info = httpx.get(f"{cluster.proxy_urls[0]}/info", timeout=ANSWER_TIMEOUT)
        assert info.status_code == 200 and info.json()["model_loaded"]
    finally:
        server.terminate()
        assert server.wait(120) == 0


def test_stopping_the_cluster_leaves_no_ray_process(cluster: TwoNodeCluster) -> None:
    assert cluster.processes()  # it was running
    left_behind = cluster.stop()
    assert left_behind == [] and cluster.processes() == []
