"""A two-node Ray cluster on this machine, made with Ray's own CLI as on real machines.

A head (`ray start --head`) and a second raylet joining it (`ray start --address`), token
authentication on with a token of its own, one CPU each, every port chosen free (so it never
meets another cluster on this machine), and the Serve proxy of the second node on a port of its
own (`RAY_SERVE_WORKER_PROXY_HTTP_PORT`: two proxies on one machine cannot share one). The
application is deployed with `serve deploy`, as docs/ray.md says.

Used by tests/test_ray_cluster.py and bench/ray_routing.py:

    with TwoNodeCluster(folder, env={"QWEN_IMAGE_MODEL": "tiny"}) as cluster:
        cluster.deploy(config)             # serve_config.yaml's content, adjusted
        httpx.get(f"{cluster.proxy_urls[1]}/info")

Stopping: `serve shutdown`, then each node's `ray start --block` gets SIGTERM, which stops that
node's processes as `ray stop` would. (`ray stop` itself stops every Ray process on the machine,
other clusters' too.) Whatever is still running afterwards is reported and killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import psutil
import yaml

BIN = Path(sys.executable).parent  # the `ray` and `serve` of this environment
STARTUP_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # the least Ray takes (75 MiB) and a margin: no images pass through it
# Variables of the machine that would point Ray elsewhere or change its authentication.
FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class TwoNodeCluster:
    """Head + one joining raylet on localhost; a context manager that always stops both."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None, cpus_per_node: int = 1) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(32)
        # Ray's socket paths must stay short: its temp folder lives directly under /tmp.
        self.temp_dir = Path(f"/tmp/qis-ray-{secrets.token_hex(4)}")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.proxy_ports = [free_port(), free_port()]
        self.cpus_per_node = cpus_per_node
        base = {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith("QWEN_IMAGE_")}
        self.env = {**base, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.sessions: list[int] = []
        self.left_behind: list[str] = []

    # -- addresses ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The head's GCS, what `ray start --address` and RAY_ADDRESS take."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """What `serve deploy --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def proxy_urls(self) -> list[str]:
        """The Serve proxy of the head, then of the second node."""
        return [f"http://127.0.0.1:{port}" for port in self.proxy_ports]

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> TwoNodeCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._node("head", "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                   "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                   f"--temp-dir={self.temp_dir}")
        wait_for(self._dashboard_up, STARTUP_TIMEOUT_S, "the head node")
        self._node("worker", f"--address={self.address}",
                   extra_env={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.proxy_ports[1])})
        wait_for(lambda: len(self.alive_nodes()) == 2, STARTUP_TIMEOUT_S, "the second node to join")

    def _node(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> None:
        log = open(self.folder / f"ray-{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        command = [str(BIN / "ray"), "start", "--block", *args, "--node-ip-address=127.0.0.1",
                   f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
                   f"--object-store-memory={OBJECT_STORE_BYTES}",
                   f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        process = subprocess.Popen(command, env={**self.env, **(extra_env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(process)
        self.sessions.append(process.pid)  # its own session: every process of the node stays in it

    def stop(self) -> list[str]:
        """Stop Serve and both nodes; what was left running (then killed) is in `left_behind`."""
        if self.nodes and self.nodes[0].poll() is None:
            self.serve("shutdown", "-y", check=False)
        for process in reversed(self.nodes):  # the joining node first, as an operator would
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
        try:
            wait_for(lambda: not self.processes(), 30, "the nodes' processes to exit")
        except TimeoutError:
            self.left_behind = [" ".join(p.cmdline())[:120] for p in self.processes()]
            for process in self.processes():
                process.kill()
        self.nodes.clear()
        for log in self.logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return self.left_behind

    def processes(self) -> list[psutil.Process]:
        """Every live process that one of the nodes started (they stay in its session)."""
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) in self.sessions and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    # -- what an operator would run ----------------------------------------------------------

    def serve(self, *args: str, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`serve <args> --address <dashboard>` with the cluster's token (or `env`'s)."""
        return subprocess.run([str(BIN / "serve"), *args, f"--address={self.dashboard}"],
                              env=env or self.env, capture_output=True, text=True, check=check, timeout=120)

    def deploy(self, config: dict[str, Any]) -> None:
        """`serve deploy` the config, then wait until the application runs."""
        path = self.folder / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.serve("deploy", str(path))
        wait_for(self._application_running, DEPLOY_TIMEOUT_S, "the application to run", interval=1.0)

    def _application_running(self) -> bool:
        status = yaml.safe_load(self.serve("status").stdout) or {}
        apps = status.get("applications") or {}
        if any(app.get("status") == "DEPLOY_FAILED" for app in apps.values()):
            raise RuntimeError(f"the deployment failed: {apps}")
        return bool(apps) and all(app.get("status") == "RUNNING" for app in apps.values())

    # -- the cluster's own view (Ray's state API on the dashboard) ----------------------------

    def _state(self, resource: str, **filters: str) -> list[dict[str, Any]]:
        params: list[tuple[str, str]] = [("limit", "1000"), ("detail", "1")]
        for key, value in filters.items():
            params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        response = httpx.get(f"{self.dashboard}/api/v0/{resource}", params=params,
                             headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict[str, Any]]:
        try:
            return self._state("nodes", state="ALIVE")
        except httpx.HTTPError:
            return []

    def replica_nodes(self) -> dict[str, str]:
        """Live Serve replica name -> the id of the node it runs on."""
        prefix = "SERVE_REPLICA::"
        return {actor["name"].rsplit("#", 1)[1]: actor["node_id"]
                for actor in self._state("actors", state="ALIVE")
                if actor.get("name", "").startswith(prefix)}

    def _dashboard_up(self) -> bool:
        try:
            return httpx.get(f"{self.dashboard}/api/version", timeout=5,
                             headers={"Authorization": f"Bearer {self.token}"}).status_code == 200
        except httpx.HTTPError:
            return False


def tiny_config(proxy_port: int, **args: Any) -> dict[str, Any]:
    """serve_config.yaml adjusted only for a cluster without GPUs: the tiny model, no GPU, the port."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    config["http_options"]["port"] = proxy_port
    config["applications"][0]["args"].update(model="tiny", ray_num_gpus=0, **args)
    return config


if __name__ == "__main__":  # start one by hand, e.g. to try docs/ray.md's steps against it
    import tempfile

    with TwoNodeCluster(Path(tempfile.mkdtemp(prefix="ray-cluster-"))) as cluster:
        print(json.dumps({"address": cluster.address, "dashboard": cluster.dashboard,
                          "proxies": cluster.proxy_urls, "RAY_AUTH_TOKEN": cluster.token}))
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
