"""Access and input limits over real HTTP: API keys, the body size limit, the prompt token
limit, and serving saved files without ever leaving the output folder."""

from __future__ import annotations

import http.client
import io
import logging
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from PIL import Image

from qwen_image_server.config.presets import PROMPT_SUFFIX
from qwen_image_server.serving.file_links import SECRET_FILE, FileLinks
from tests.conftest import LiveServer, tiny_settings

FAST = {"num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}
KEYS = ["key-one-7f3a9c", "key-two-b81e22"]


def assert_error(r: httpx.Response, status: int, type_: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    if param is not None:
        assert error["param"] == param
    return error


# -- API keys ---------------------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path, caplog) -> LiveServer:
    caplog.set_level(logging.DEBUG)  # so the test sees everything the server might log
    live = LiveServer(tiny_settings(tmp_path, api_keys=KEYS, log_level="debug")).start()
    yield live
    live.stop()


def test_api_keys_guard_every_route_but_the_open_ones(keyed, caplog):
    with keyed.client() as c:
        for path in ("/info", "/v1/anything/added/later", "/no/such/route", "/files/x.png"):
            error = assert_error(c.get(path), 401, "authentication_error")
            assert error["code"] == "missing_api_key"
        r = c.post("/generate", json={"prompt": "a cat", **FAST})
        assert_error(r, 401, "authentication_error")
        assert r.headers["WWW-Authenticate"] == "Bearer"

        wrong = c.get("/info", headers={"Authorization": f"Bearer {KEYS[0]}x"})
        assert assert_error(wrong, 401, "authentication_error")["code"] == "invalid_api_key"
        assert c.get("/info", headers={"X-API-Key": KEYS[0][:-1]}).status_code == 401
        assert c.get("/info", headers={"Authorization": f"Basic {KEYS[0]}"}).status_code == 401

        assert c.get("/info", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
        assert c.get("/info", headers={"authorization": f"bearer {KEYS[1]}"}).status_code == 200
        assert c.get("/info", headers={"X-API-Key": KEYS[1]}).status_code == 200
        r = c.post("/generate", json={"prompt": "a cat", **FAST}, headers={"X-API-Key": KEYS[0]})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"

        for path in ("/health", "/ready", "/metrics"):
            assert c.get(path).status_code == 200, path
        for path in ("/", "/static/app.js"):  # the web page asks the user for the key
            assert c.get(path).status_code != 401, path
    assert "401 for GET /info: invalid API key" in caplog.text  # refusals are logged...
    assert not any(key in caplog.text for key in KEYS)  # ...never the keys, good or bad


def test_no_keys_configured_means_open(client):
    assert client.get("/info").status_code == 200


# -- body size ------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_in_the_common_shape(client, tiny_server):
    limit = tiny_server.settings.max_body_bytes
    assert limit == 1024 * 1024  # the default
    big = b'{"prompt": "' + b"a" * limit + b'"}'
    error = assert_error(client.post("/generate", content=big, headers={"Content-Type": "application/json"}),
                         413, "request_too_large")
    assert str(limit) in error["message"]

    def chunks():  # no Content-Length: the server must count what arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start:start + 64 * 1024]

    r = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "request_too_large")

    under = b'{"prompt": "", "x": "' + b"a" * (limit - 100) + b'"}'  # fits: judged on its content
    assert_error(client.post("/generate", content=under, headers={"Content-Type": "application/json"}),
                 400, "invalid_request_error", "prompt")
    assert client.get("/health").json()["status"] == "healthy"


# -- prompt tokens --------------------------------------------------------------------------


def accepted_jobs(live: LiveServer) -> int:
    s = live.scheduler()
    return s["queue_length"] + s["running_batch_size"] + s["processed"] + s["failed"] + s["cancelled"]


def test_a_prompt_over_the_token_limit_is_refused_before_queueing(client, tiny_server, tiny_pipeline):
    pipeline = tiny_pipeline
    limit = pipeline.tokenizer_max_length
    assert limit == 1024

    def model_tokens(prompt: str) -> int:
        """The prompt as the model reads it (language suffix included), by the model's tokenizer."""
        return len(pipeline.tokenizer(prompt + PROMPT_SUFFIX["en"])["input_ids"])

    at_limit = "cat" + " cat" * (limit - model_tokens("cat"))  # " cat" is one token
    assert model_tokens(at_limit) == limit
    before = accepted_jobs(tiny_server)
    r = client.post("/generate", json={"prompt": at_limit + " cat", **FAST})
    error = assert_error(r, 400, "invalid_request_error", "prompt")
    assert f"{limit + 1} tokens" in error["message"] and f"at most {limit}" in error["message"]

    r = client.post("/generate", json={"prompt": "a cat", "negative_prompt": "blurry " * 1100, **FAST})
    assert_error(r, 400, "invalid_request_error", "negative_prompt")
    assert accepted_jobs(tiny_server) == before  # neither was queued

    assert client.post("/generate", json={"prompt": at_limit, **FAST}).status_code == 200


# -- saved files ----------------------------------------------------------------------------


def raw_get(url: str, path: str) -> tuple[int, dict]:
    """GET `path` byte for byte (httpx would resolve '..' before sending)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, httpx.Response(response.status, content=response.read()).json()
    finally:
        conn.close()


def test_saved_files_are_served_through_their_link(client):
    body = client.post("/generate", json={"prompt": "a lighthouse", "save_to_file": True, **FAST}).json()
    assert Path(body["file_path"]).name in body["file_url"]
    r = client.get(body["file_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(body["file_path"]).read_bytes()
    assert Image.open(io.BytesIO(r.content)).size == (512, 512)


def test_files_never_leave_the_output_folder(client, tiny_server, tmp_path):
    """Even with a valid signature (made here with the server's own key), nothing outside the
    server's saved images is served."""
    out = tiny_server.settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    links = FileLinks((out / SECRET_FILE).read_bytes().strip(), ttl_s=600)

    def signed(path: str) -> str:
        return f"{path}?{links.query(unquote(path.removeprefix('/files/')), None)}"

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    planted = out / "Qwen-Image-20240101_000000-req9001.png"  # the server's own pattern...
    planted.symlink_to(secret)  # ...but a link to a file outside
    (out / "Qwen-Image-20240101_000000-req9002.png").mkdir()  # not a regular file
    try:
        for name in (planted.name, "Qwen-Image-20240101_000000-req9002.png",
                     "Qwen-Image-20240101_000000-req9003.png", "secret.png", "notes.txt"):
            assert_error(client.get(signed(f"/files/{name}")), 404, "not_found")
        for path in ("/files/../secret.png", "/files/..", "/files/%2e%2e", "/files/%2e%2e%2fsecret.png",
                     "/files/..%2Fsecret.png", "/files/..%2F..%2Fetc%2Fpasswd", "/files//etc/passwd",
                     f"/files/%2F{str(secret).lstrip('/')}", f"/files/{secret}",
                     "/files/%2e%2e%2fout%2fQwen-Image-20240101_000000-req9001.png"):
            status, body = raw_get(tiny_server.url, signed(path))
            assert status == 404 and body["error"]["type"] == "not_found", path
    finally:
        planted.unlink()
        (out / "Qwen-Image-20240101_000000-req9002.png").rmdir()
