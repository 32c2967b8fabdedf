"""The Dockerfile, built and run for real: scripts/build_cpu_image.sh builds it with buildah on a
Debian base made by debootstrap and the CPU torch; the server then runs inside the image
(`buildah run`, the image's own entrypoint, user and environment) on the tiny model, which it
builds at its first start, and answers /generate with a PNG over HTTP.

Slow (minutes) and root-only, so it runs as its own step of .ci/run after the test suite, with
QWEN_IMAGE_CONTAINER_TEST=1; in that step a missing buildah or a failed build fails it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.conftest import ROOT, wait_until

TAG = "localhost/qwen-image-server:cpu-test"
START_TIMEOUT = 300.0  # s: the first start imports torch and builds the tiny model

pytestmark = [pytest.mark.timeout(2400), pytest.mark.skipif(
    os.environ.get("QWEN_IMAGE_CONTAINER_TEST") != "1",
    reason="builds the container image (minutes, as root): .ci/run runs it with QWEN_IMAGE_CONTAINER_TEST=1")]


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"buildah {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def image() -> str:
    assert shutil.which("buildah"), "buildah is missing: apt-get install buildah debootstrap"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_cpu_image.sh"), TAG],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"the build failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    print(done.stdout.strip().splitlines()[-1])  # build time and size (pytest -s shows it)
    return TAG


@pytest.fixture(scope="module")
def config(image: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", image))["Docker"]["config"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def running(image: str, config: dict, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The image's entrypoint, run in a container of the image, on a free port of this machine."""
    container = buildah("from", "--pull-never", image).strip()
    port = free_port()
    log = tmp_path_factory.mktemp("container") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", "--env", f"PORT={port}", "--env", "THREADS=2",
             container, "--", *config["Entrypoint"]],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert server.poll() is None, f"the server exited ({server.returncode}):\n{log.read_text()[-4000:]}"
        try:
            return httpx.get(f"{url}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, START_TIMEOUT, "the server in the container to be ready", interval=1.0)
        yield url, container
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # Gunicorn drains and exits
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        buildah("rm", container)


def test_the_image_runs_as_a_user_with_volumes_a_port_a_healthcheck_and_labels(config):
    assert config["Entrypoint"] == ["qwen-image", "serve"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"5000/tcp"}
    assert set(config["Volumes"]) == {"/cache", "/srv/qwen-image/outputs", "/srv/qwen-image/data"}
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "qwen-image-server"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert len(labels["org.opencontainers.image.revision"]) == 40  # the commit it was built from
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["QWEN_IMAGE_CACHE_DIR"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")


def test_the_server_in_the_image_makes_a_png(running, config):
    url, container = running
    r = httpx.post(f"{url}/generate", timeout=120, json={
        "prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (512, 512)
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "healthy" and health["device"] == "cpu"
    # The health check the image declares, run in the container, passes against this server.
    [kind, *command] = config["Healthcheck"]["Test"]
    assert kind == "CMD"
    buildah("run", "--isolation", "chroot", "--env", f"PORT={url.rsplit(':', 1)[1]}", container, "--", *command)
    # As the unprivileged user, writing where the volumes are.
    assert buildah("run", "--isolation", "chroot", container, "--", "id", "-u").strip() == "10001"
    tiny = buildah("run", "--isolation", "chroot", container, "--", "ls", "/cache/qwen-image-server")
    assert tiny.strip(), "the tiny model was not built under /cache"
