"""Results in shared storage (QWEN_IMAGE_RESULTS_URL): an image made on one server is served by
another, and by the storage itself once its server is gone; only to its owner.

The bucket is moto's standalone S3 server, started here on a free port and reached over HTTP by
boto3 exactly as a real bucket would be (AWS_ENDPOINT_URL, dummy credentials); the shared folder
is a temp folder. Two in-process servers, A and B, share each (on the fake engine).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from qwen_image_server.api.app import create_app
from qwen_image_server.config.settings import Settings
from qwen_image_server.errors import ConfigurationError
from qwen_image_server.serving.job_store import SqliteJobStore
from qwen_image_server.serving.object_store import FolderObjectStore, image_key, open_object_store
from tests.conftest import ROOT, LiveServer, free_port, tiny_settings, wait_until
from tests.fakes import FakeEngine

pytestmark = pytest.mark.xdist_group("object_storage")  # one moto server, one pair of servers per storage

FAST = {"num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}
OPENAI = {"size": "256x256", "num_inference_steps": 2, "response_format": "url"}
ALICE, BOB = "alice-0b1c2d3e4f5a6b7c", "bob-8d9e0f1a2b3c4d5e"
BUCKET = "results"


def as_(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {who}"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server on a free port, with a bucket; boto3 in this process (the servers' too)
    reaches it through its standard environment, and reads no AWS files of this machine."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(nowhere))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance metadata service
        env.delenv("AWS_PROFILE", raising=False)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    moto.stop()


@pytest.fixture(scope="module", params=["s3", "file"])
def results_url(request, tmp_path_factory) -> str:
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        return f"s3://{BUCKET}/qwen/results"
    return (tmp_path_factory.mktemp("shared") / "results").as_uri()


def start(tmp: Path, results_url: str) -> LiveServer:
    """A server on the fake engine (instant solid-colour PNGs): what is at stake here is where the
    bytes are kept and who gets them, not the model's pixels."""
    return LiveServer(tiny_settings(tmp, results_url=results_url, api_keys=[ALICE, BOB]), FakeEngine).start()


@pytest.fixture(scope="module")
def pair(results_url, tmp_path_factory) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Servers A and B: same keys, same results URL, each its own data and output folders."""
    a = start(tmp_path_factory.mktemp("a"), results_url)
    b = start(tmp_path_factory.mktemp("b"), results_url)
    yield a, b
    a.stop()
    b.stop()


def url_image(live: LiveServer, who: str = ALICE, **fields) -> str:
    r = httpx.post(f"{live.url}/v1/images/generations", json={"prompt": "a lighthouse", **OPENAI, **fields},
                   headers=as_(who), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["url"]


def image_id(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1]


def is_png(data: bytes) -> bool:
    return Image.open(io.BytesIO(data)).format == "PNG"


def test_a_url_image_is_served_by_another_server_and_only_to_its_owner(pair, results_url):
    a, b = pair
    url = url_image(a)
    if results_url.startswith("s3:"):
        # A presigned URL of the bucket's object: the storage serves it, to whoever holds the link.
        assert not url.startswith(a.url) and "X-Amz-Signature=" in url
        direct = httpx.get(url)
        assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
        image = direct.content
        image_path = f"/v1/images/{image_id(url)}"
    else:
        assert url.startswith(f"{a.url}/v1/images/")
        image = httpx.get(url, headers=as_(ALICE)).content
        image_path = urlsplit(url).path
    assert is_png(image)
    from_b = httpx.get(f"{b.url}{image_path}", headers=as_(ALICE))
    assert from_b.status_code == 200 and from_b.content == image
    # Another key, on either server: no such image.
    for live in (a, b):
        other = httpx.get(f"{live.url}{image_path}", headers=as_(BOB))
        assert other.status_code == 404 and other.json()["error"]["param"] == "image_id"


def test_url_images_outlive_the_server_that_made_them(results_url, pair, tmp_path):
    _, b = pair
    bucket = results_url.startswith("s3:")
    a = start(tmp_path, results_url)
    try:
        url = url_image(a)
        made = httpx.get(url, headers={} if bucket else as_(ALICE)).content
    finally:
        a.stop()
    assert is_png(made)
    if bucket:
        assert httpx.get(url).content == made  # the link A returned, with A gone
    from_b = httpx.get(f"{b.url}/v1/images/{image_id(url)}", headers=as_(ALICE))
    assert from_b.status_code == 200 and from_b.content == made


def test_a_jobs_image_is_read_from_the_shared_storage_by_any_server(pair, results_url, tmp_path):
    a, b = pair
    job = httpx.post(f"{a.url}/v1/jobs", json={"prompt": "a lighthouse", **FAST}, headers=as_(ALICE)).json()
    status: dict = {}

    def ended() -> bool:
        status.update(httpx.get(f"{a.url}/v1/jobs/{job['id']}", headers=as_(ALICE), timeout=30).json())
        return status["status"] in ("succeeded", "failed", "cancelled")

    wait_until(ended, 120, "the job to end")
    assert status["status"] == "succeeded"
    image = httpx.get(f"{a.url}/v1/jobs/{job['id']}/image", headers=as_(ALICE)).content
    # B never saw the job (its job store is its own), yet serves its image to its owner only.
    from_b = httpx.get(f"{b.url}/v1/images/job-{job['id']}", headers=as_(ALICE))
    assert from_b.status_code == 200 and from_b.content == image
    assert httpx.get(f"{b.url}/v1/images/job-{job['id']}", headers=as_(BOB)).status_code == 404
    # A job store of any other server on the same storage reads it (as a shared job store will).
    other = SqliteJobStore(tmp_path / "another-server", open_object_store(b.settings.results_url))
    try:
        assert other.image(job["id"]) == image
    finally:
        other.close()


# A shared folder keeps /files links (servers sharing output_dir accept each other's already).
@pytest.mark.parametrize("results_url", ["s3"], indirect=True)
def test_save_to_file_links_to_the_buckets_copy(pair):
    a, _ = pair
    r = httpx.post(f"{a.url}/generate", json={"prompt": "a lighthouse", "save_to_file": True, **FAST},
                   headers=as_(ALICE), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    saved = Path(answer["file_path"])
    assert saved.name.startswith("Qwen-Image-") and saved.exists()  # still saved where it was
    assert not answer["file_url"].startswith(a.url) and "X-Amz-Signature=" in answer["file_url"]
    copy = httpx.get(answer["file_url"])
    assert copy.status_code == 200 and copy.content == saved.read_bytes()


def test_a_storage_that_refuses_loses_no_image(s3_endpoint, tmp_path):
    """A bucket that is not there: url images are kept in the server's memory and served by its
    own link; a save_to_file answer says the copy failed and carries the image itself."""
    live = start(tmp_path, "s3://no-such-bucket/x")
    try:
        url = url_image(live)
        assert url.startswith(f"{live.url}/v1/images/")
        assert is_png(httpx.get(url, headers=as_(ALICE)).content)
        r = httpx.post(f"{live.url}/generate", json={"prompt": "a lighthouse", "save_to_file": True, **FAST},
                       headers=as_(ALICE), timeout=120)
        answer = r.json()
        assert answer["save_error"]["code"] == "upload_failed" and answer["file_url"] is None
        assert is_png(base64.b64decode(answer["b64_json"]))
    finally:
        live.stop()


def test_a_folder_sweep_deletes_what_is_past_its_expiry(tmp_path):
    store = FolderObjectStore(tmp_path)
    now = time.time()
    store.put(image_key("short"), b"png", "image/png", owner="key-a", expires_at=now + 10)
    store.put(image_key("long"), b"png", "image/png", owner="key-a", expires_at=now + 1000)
    assert store.get(image_key("short"), now).owner == "key-a"
    assert store.get(image_key("short"), now + 11) is None  # never served past its expiry
    assert store.sweep(now + 11) == 1
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [".long.meta.json", "long"]
    assert store.get(image_key("../images/long"), now) is None  # not a key: nothing outside the folder


def test_results_url_is_checked_at_start(tmp_path, monkeypatch):
    for bad in ("http://example.com/x", "s3:///no-bucket", "file://otherhost/x", "s3://AKIA:secret@bucket/x"):
        with pytest.raises(ValidationError, match="results_url"):
            Settings(_env_file=None, results_url=bad)
    # No credentials anywhere boto3 looks: one line naming where it looked, before anything starts.
    nowhere = str(tmp_path / "none")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigurationError, match="boto3 finds no credentials"):
        create_app(tiny_settings(tmp_path, results_url="s3://bucket/prefix"))
    # boto3 not installed: `serve` stops before starting anything, with one line saying what to install.
    (tmp_path / "no-boto3" / "boto3").mkdir(parents=True)
    (tmp_path / "no-boto3" / "boto3" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "no-boto3"), str(ROOT)]),
           "QWEN_IMAGE_RESULTS_URL": "s3://bucket/prefix", "HOST": "127.0.0.1", "PORT": str(free_port())}
    run = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve", "--model", "tiny",
                          "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: QWEN_IMAGE_RESULTS_URL=s3://bucket/prefix needs boto3, which is not installed: "
        "pip install 'qwen-image-server[s3]'."]
