"""Uploaded images: decoded, checked and normalised on the CPU pool; every bad upload is a 400
(or 413) naming its field, and nothing reaches the engine.

The HTTP tests run the real app with the fake engine (instant images): what is tested is what a
client sees for its uploads, not the model.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from qwen_image_server import errors
from qwen_image_server.api.app import create_app
from qwen_image_server.protocol.common import MAX_PROMPT_CHARS
from qwen_image_server.serving.uploads import WORKING_PIXELS, Upload, read_edit_inputs
from tests.conftest import LiveServer, hold_engine, tiny_settings, wait_until
from tests.fakes import FakeEngine

MAX_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def decoded(data: bytes, mask: bytes | None = None, max_pixels: int = MAX_PIXELS):
    return read_edit_inputs([Upload("image", data)], Upload("mask", mask) if mask else None, max_pixels)


def refused(data: bytes, *, mask: bytes | None = None, max_pixels: int = MAX_PIXELS) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as caught:
        decoded(data, mask, max_pixels)
    return caught.value


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


# -- colour modes, orientation, size ---------------------------------------------------------


def test_every_colour_mode_becomes_the_rgb_a_viewer_shows():
    red = (200, 30, 40)
    cmyk = Image.new("RGB", (32, 16), red).convert("CMYK")
    palette = Image.new("RGB", (32, 16), red).convert("P", palette=Image.Palette.ADAPTIVE)
    grey = Image.new("L", (32, 16), 90)
    rgba = Image.new("RGBA", (32, 16), (*red, 255))
    half_transparent = Image.new("RGBA", (32, 16), (0, 0, 0, 0))  # nothing: white, as a viewer on white
    for image, fmt, want in [(cmyk, "JPEG", red), (palette, "PNG", red), (grey, "PNG", (90, 90, 90)),
                             (rgba, "PNG", red), (half_transparent, "PNG", (255, 255, 255)),
                             (rgba, "WEBP", red)]:
        [out] = decoded(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))).images
        assert out.mode == "RGB" and out.size == (32, 16)
        got = np.asarray(out).reshape(-1, 3).mean(axis=0)
        assert np.abs(got - want).max() <= 8, (image.mode, fmt, got)


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(1, 64).repeat(8, axis=0)
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    [out] = decoded(encode(source)).images
    row = np.asarray(out)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[32] - 130) <= 2  # a ramp, not a white bar


def test_every_deep_greyscale_mode_is_scaled_like_sixteen_bit_png():
    # 16-bit TIFF in either byte order, 32-bit integer TIFF (clipped above 65535), float TIFF
    # (scaled from its brightest pixel).
    values = np.array([[0, 257 * 64, 65535]])
    cases = [(Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes()), [0, 64, 255]),
             (Image.frombytes("I;16L", (3, 1), values.astype("<u2").tobytes()), [0, 64, 255]),
             (Image.fromarray(np.array([[-5, 257 * 64, 10**6]], dtype=np.int32), "I"), [0, 64, 255]),
             (Image.fromarray(np.array([[0.0, 1.0, 4.0]], dtype=np.float32), "F"), [0, 64, 255])]
    for source, want in cases:
        [out] = decoded(encode(source, "TIFF")).images
        assert np.asarray(out)[0, :, 0].tolist() == want, source.mode


def test_exif_orientation_is_applied_so_the_edit_sees_the_photo_upright():
    wide = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    inputs = decoded(encode(wide, "JPEG", exif=exif))
    assert inputs.first_size == (20, 40) and inputs.images[0].size == (20, 40)


def test_large_images_are_scaled_to_the_working_size_keeping_the_aspect_ratio():
    inputs = decoded(encode(Image.new("RGB", (1800, 1200), (1, 2, 3)), "JPEG"))
    width, height = inputs.images[0].size
    assert inputs.first_size == (1800, 1200)
    assert width * height <= WORKING_PIXELS * 1.01 and abs(width / height - 1.5) < 0.01


# -- refusals --------------------------------------------------------------------------------


def test_refusals_name_the_field_and_say_why():
    assert refused(b"hello, not an image").code == "invalid_image"
    full = encode(Image.new("RGB", (64, 64), (9, 9, 9)))
    truncated = refused(encode(Image.effect_noise((64, 64), 50).convert("RGB"))[:300])
    assert truncated.code == "corrupt_image" and truncated.param == "image"
    ppm = refused(encode(Image.new("RGB", (8, 8)), "PPM"))
    assert ppm.code == "unsupported_image_format" and "PPM" in ppm.message
    small_limit = refused(full, max_pixels=1000)
    assert small_limit.code == "image_too_large" and "64x64" in small_limit.message


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 100
    error = refused(bomb)
    assert error.code == "image_too_large" and error.param == "image"


def test_masks_follow_openais_meaning_and_must_fit_the_first_image():
    image = encode(Image.new("RGB", (40, 30), (50, 60, 70)))
    mask = Image.new("RGBA", (40, 30), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (10, 5, 20, 15))  # transparent: the area to change
    inputs = decoded(image, encode(mask))
    change = np.asarray(inputs.mask)
    assert change[10, 15] == 255 and change[0, 0] == 0 and inputs.mask.size == inputs.images[0].size

    wrong = refused(image, mask=encode(Image.new("RGBA", (41, 30))))
    assert (wrong.param, wrong.code) == ("mask", "mask_size_mismatch") and "40x30" in wrong.message
    opaque = refused(image, mask=encode(Image.new("RGB", (40, 30))))
    assert (opaque.param, opaque.code) == ("mask", "mask_without_alpha")


# -- over HTTP: fields named, limits, the CPU pool -------------------------------------------


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    settings = tiny_settings(tmp_path_factory.mktemp("uploads"), max_upload_bytes=200_000)
    live = LiveServer(settings, engine_factory=FakeEngine).start()
    yield live
    live.stop()


def png(size=(48, 32), color=(120, 80, 40)) -> bytes:
    return encode(Image.new("RGB", size, color))


def edit(client: httpx.Client, files, **data) -> httpx.Response:
    return client.post("/v1/images/edits", data={"prompt": "make it night", **data}, files=files)


def assert_error(response: httpx.Response, status: int, param: str | None, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


def test_bad_uploads_are_400s_naming_the_field_and_the_server_keeps_serving(fake_server):
    with fake_server.client() as client:
        assert_error(edit(client, [("image[]", ("a.png", png())), ("image[]", ("b.txt", b"plain text"))]),
                     400, "image[1]", "invalid_image")
        four = [("image[]", (f"{i}.png", png())) for i in range(4)]
        error = assert_error(edit(client, four), 400, "image", "too_many_images")
        assert "at most 3" in error["message"]
        two_and_mask = [("image[]", ("a.png", png())), ("image[]", ("b.png", png())),
                        ("mask", ("m.png", encode(Image.new("RGBA", (48, 32)))))]
        assert_error(edit(client, two_and_mask), 400, "mask", "mask_with_several_images")
        assert_error(edit(client, [("image", ("a.png", png()))], size="100x100"), 400, "size", "invalid_size")
        assert_error(client.post("/edit", json={"prompt": "x", "images": ["%%%"]}), 400, "images", "invalid_base64")
        assert_error(edit(client, []), 400, "image", "missing_image")
        # And a good one still works.
        ok = edit(client, [("image", ("a.png", png()))])
        assert ok.status_code == 200 and ok.json()["size"] == "384x256"  # 48x32 snapped into 256-2048
    assert fake_server.scheduler()["processed"] == 1  # only the good one reached the engine


def test_an_edit_sent_to_a_server_without_an_edit_model_names_model(tmp_path):
    settings = tiny_settings(tmp_path, model="painter=tiny")  # the generation model alone
    live = LiveServer(create_app(settings, engine_factory=lambda: FakeEngine())).start()
    try:
        with live.client() as client:
            error = assert_error(edit(client, [("image", ("a.png", png()))]), 400, "model", "model_cannot_do_task")
            assert "no edit model" in error["message"] and "painter" in error["message"]
            assert_error(edit(client, [("image", ("a.png", png()))], model="nope"), 404, "model", "model_not_found")
    finally:
        live.stop()


def test_uploads_over_the_limit_are_413_declared_or_chunked(fake_server):
    limit = fake_server.settings.max_upload_bytes
    noise = encode(Image.effect_noise((400, 400), 80).convert("RGB"))
    assert len(noise) > limit
    with fake_server.client() as client:
        declared = assert_error(edit(client, [("image", ("big.png", noise))]), 413, None, "body_too_large")
        assert str(limit) in declared["message"]
        body = httpx.Request("POST", "/", files=[("image", ("big.png", noise))], data={"prompt": "x"})
        content = body.read()

        def chunks():
            for start in range(0, len(content), 32 * 1024):
                yield content[start:start + 32 * 1024]

        r = client.post("/v1/images/edits", content=chunks(), headers={"Content-Type": body.headers["Content-Type"]})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, None, "body_too_large")
        # The JSON routes keep their own limit: a body over the upload limit is fine there.
        assert fake_server.settings.max_body_bytes > 2 * limit
        padded = {"prompt": "a cat", "num_inference_steps": 1, "padding": "x" * (2 * limit)}  # ignored field
        assert client.post("/generate", json=padded).status_code == 200
        assert client.get("/health").json()["status"] == "healthy"


def test_uploads_are_decoded_on_the_cpu_pool(fake_server, monkeypatch):
    threads: list[str] = []
    real = Image.open

    def recording(*args, **kwargs):  # Pillow's own decoder entry: where an upload is decoded
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(Image, "open", recording)
    with fake_server.client() as client:
        assert edit(client, [("image", ("a.png", png()))]).status_code == 200
    assert threads and all(name.startswith("qwen-image-cpu") for name in threads), threads


# -- what an edit costs the front: descriptors, memory, work before admission ----------------


@pytest.fixture(scope="module")
def roomy_server(tmp_path_factory):
    """The default upload limit (50 MB), and room for hundreds of jobs, queued and finished."""
    settings = tiny_settings(tmp_path_factory.mktemp("roomy"), max_queue=512, max_stored_results=512)
    live = LiveServer(settings, engine_factory=FakeEngine).start()
    yield live
    live.stop()


def noise_png(nbytes: int) -> bytes:
    """An RGB PNG of random pixels, about `nbytes` long (noise does not compress): a photo's size."""
    side = int((nbytes / 3) ** 0.5)
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), compress_level=1)


def open_descriptors() -> int:
    """File descriptors open in this process, where the in-process server runs."""
    return len(os.listdir("/proc/self/fd"))


def test_edit_jobs_keep_no_upload_open_for_their_records_lifetime(roomy_server):
    # Starlette keeps each part over 1 MiB (its spool size) in a temporary file, whatever its size
    # beyond that. A job's record lives for the result TTL (an hour): were the uploads kept open
    # in it, 300 photo edits would hold 300 descriptors, and a front with the usual limit of 1024
    # would soon fail to accept() connections.
    photo = noise_png(int(1.2 * 1024 * 1024))
    assert len(photo) > 1024 * 1024
    fields = {"prompt": "make it night", "size": "256x256", "num_inference_steps": "1", "add_overlay": "false"}
    clients = [roomy_server.client() for _ in range(4)]

    def edit_job(index: int) -> str:
        r = clients[index % 4].post("/v1/jobs/edit", data=fields, files=[("image", ("photo.png", photo, "image/png"))])
        assert r.status_code == 202, r.text
        return r.json()["id"]

    try:
        [edit_job(i) for i in range(4)]  # each client's connection, the pool threads: open from now on
        processed = roomy_server.wait_scheduler("the first jobs", queue_length=0, running_batch_size=0)["processed"]
        before = open_descriptors()
        with ThreadPoolExecutor(4) as senders:  # four at a time: the two cores both work
            ids = list(senders.map(edit_job, range(300)))
        roomy_server.wait_scheduler("all 300 jobs to finish", processed=processed + 300)
        status = clients[0].get
        wait_until(lambda: all(status(f"/v1/jobs/{id_}").json()["status"] == "succeeded" for id_ in ids[-4:]),
                   30, "the last jobs' images to be stored")
        after = open_descriptors()
        # Every record is still kept (the TTL is an hour): the count is flat although none was dropped.
        assert status(f"/v1/jobs/{ids[0]}").json()["status"] == "succeeded"
    finally:
        for client in clients:
            client.close()
    assert after - before < 20, f"{after - before} more descriptors open after 300 edit jobs"


def deep_png(width: int, height: int, *, cut: int = 0) -> bytes:
    """A 16-bit greyscale PNG, a ramp from black to white in every row: width x height pixels in a
    few hundred KB. With `cut`, its pixel stream ends that many bytes early: decoding it does
    nearly all the work, then fails."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = np.linspace(0, 65535, width).astype(">u2").tobytes()
    pixels = zlib.compress((b"\0" + row) * height, 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels[:len(pixels) - cut]) + chunk(b"IEND", b""))


def test_a_full_queue_refuses_an_edit_before_decoding_its_upload(server):
    # Decoding runs on the CPU pool that also encodes every client's results: a request the queue
    # refuses anyway must not take it. The upload here is a 9-megapixel 16-bit image whose data is
    # cut short: decoding it ends in a 400 (shown below, once there is room), so a 429 for it
    # means the server answered without decoding it.
    live = server(engine=FakeEngine, max_queue=1)
    upload = deep_png(3000, 3000, cut=64)
    form = {"prompt": "make it night", "size": "256x256", "num_inference_steps": "1"}
    with hold_engine(live), live.client() as client:
        assert client.post("/v1/jobs", json={"prompt": "a", "num_inference_steps": 1}).status_code == 202
        live.wait_running()
        assert client.post("/v1/jobs", json={"prompt": "b", "num_inference_steps": 1}).status_code == 202
        live.wait_scheduler("the queue to be full", queue_length=1)
        refusals = [
            client.post("/v1/jobs/edit", data=form, files=[("image", ("deep.png", upload, "image/png"))]),
            client.post("/v1/images/edits", data=form, files=[("image", ("deep.png", upload, "image/png"))]),
            client.post("/edit", json={**form, "num_inference_steps": 1,
                                       "images": [base64.b64encode(upload).decode()]}),
        ]
        for r in refusals:
            assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full", r.text
            assert int(r.headers["Retry-After"]) >= 1
    live.wait_scheduler("the held jobs to finish", queue_length=0, running_batch_size=0)
    with live.client() as client:
        r = client.post("/v1/jobs/edit", data=form, files=[("image", ("deep.png", upload, "image/png"))])
        assert_error(r, 400, "image", "corrupt_image")
    assert live.scheduler()["processed"] == 2  # the refused edits never reached the engine


def test_a_sixteen_bit_edit_works_in_a_few_bytes_a_pixel(roomy_server):
    # A 16-megapixel 16-bit PNG is a quarter of a megabyte on the wire; decoded through float64
    # arrays it took about 28 bytes a pixel (450 MB here; 1 GB at the 40-megapixel cap). The
    # front's peak memory while it serves the edit is measured: /proc's high-water mark, reset.
    width = height = 4000
    upload = deep_png(width, height)
    assert len(upload) < 512 * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"this kernel does not let a process reset its peak memory: {exc}")
    base = memory_kib("VmRSS")
    with roomy_server.client() as client:
        r = client.post("/v1/images/edits", data={"prompt": "make it night", "size": "256x256"},
                        files=[("image", ("deep.png", upload, "image/png"))])
    peak = (memory_kib("VmHWM") - base) * 1024
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"], r.text
    # Pillow's own images: 16-bit (2 bytes), scaled (2), 8-bit (1), RGB (4), not all at once.
    assert peak < 12 * width * height, f"{peak / 2**20:.0f} MiB at peak, {peak / (width * height):.1f} B/px"


def memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_an_over_long_prompt_is_a_400_naming_it_before_anything_reads_it(roomy_server):
    # A JSON edit may be as large as the upload limit (50 MB), nearly all of it prompt. Counting
    # its tokens would take about a minute of the CPU pool; the model reads 1024 of them.
    image = base64.b64encode(png()).decode()
    huge = "a cat on a red chair " * (2 * 1024 * 1024)  # 44 MB
    too_long, longest = "x" * (MAX_PROMPT_CHARS + 1), "x" * MAX_PROMPT_CHARS
    with roomy_server.client() as client:
        r = client.post("/v1/jobs/edit", json={"prompt": huge, "images": [image]})
        error = assert_error(r, 400, "prompt", "string_too_long")
        assert f"{MAX_PROMPT_CHARS}" in error["message"]
        generate = {"prompt": "a cat", "num_inference_steps": 1, "size": "256x256"}
        assert_error(client.post("/v1/images/generations", json={**generate, "negative_prompt": too_long}),
                     400, "negative_prompt", "string_too_long")
        assert_error(edit(client, [("image", ("a.png", png()))], prompt=too_long), 400, "prompt", "string_too_long")
        # OpenAI's own bound for gpt-image prompts is the same: what it takes, the schema takes.
        assert client.post("/v1/images/generations", json={**generate, "prompt": longest}).status_code == 200
