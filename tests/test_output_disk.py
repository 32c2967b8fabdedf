"""The output folder over real HTTP: a free-space floor (/ready 503, saves refused with 507 before
any work), saves that fail without losing the image or leaving temp files, retention of saved
images; and `save_atomically`'s guarantees (no overwriting, no writing through a planted name,
the folder fsynced)."""

from __future__ import annotations

import base64
import errno
import io
import logging
import os
import resource
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from qwen_image_server.serving import render
from qwen_image_server.serving.render import save_atomically
from tests.conftest import LiveServer, tiny_settings, wait_until
from tests.test_metrics import scrape, value

FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}
HUGE_FLOOR_MB = 2**40  # more free space than any disk has
PNG_1X1 = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
    "9c63f8cfc0000003010100c9fe92ef0000000049454e44ae426082")).decode()


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_, error
    if param is not None:
        assert error["param"] == param, error
    return error


def finished_job(client: httpx.Client, body: dict) -> dict:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    state: dict = {}

    def done() -> bool:
        state.update(client.get(f"/v1/jobs/{job_id}").json())
        return state["status"] in ("succeeded", "failed", "cancelled")

    wait_until(done, 120, f"job {job_id} to finish")
    return state


# -- the free-space floor ---------------------------------------------------------------------

def test_below_the_disk_floor_ready_is_503_and_saves_are_refused_before_any_work(server):
    live = server(min_free_disk_mb=HUGE_FLOOR_MB, wait_ready=False)
    with live.client() as c:
        wait_until(lambda: c.get("/health").json()["model_loaded"], 180, "the model to load")
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "reason": "low disk space"}
        before = scrape(c)
        assert 0 < value(before, "qwen_image_output_disk_free_bytes") < HUGE_FLOOR_MB * 2**20

        edit = {"prompt": "make it blue", "images": [PNG_1X1], "num_inference_steps": 2}
        for path, body in (("/generate", FAST), ("/v1/jobs", FAST), ("/edit", edit)):
            error = assert_error(c.post(path, json={**body, "save_to_file": True}), 507,
                                 "insufficient_storage", param="save_to_file")
            assert "save_to_file" in error["message"] and "QWEN_IMAGE_MIN_FREE_DISK_MB" in error["message"]
        assert live.hook.calls == []  # nothing reached the engine
        assert value(scrape(c), "qwen_image_images_generated_total") == value(
            before, "qwen_image_images_generated_total")
        assert not list(live.settings.output_dir.glob("*.png"))  # no image saved

        # What saves nothing is still served.
        plain = c.post("/generate", json=FAST)
        assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
        assert len(live.hook.calls) == 1


# -- saves that fail --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saving_server(tmp_path_factory) -> Iterator[LiveServer]:
    """A server whose output folder the tests take away or fill; each test puts it back."""
    tmp = tmp_path_factory.mktemp("saving")
    # Jobs kept in memory: a test here caps the size of every file this process writes, and the
    # job store's database is a file too (what a full data disk does to jobs is not this file's subject).
    live = LiveServer(tiny_settings(tmp, output_dir=tmp / "mount" / "out", store="memory")).start()
    yield live
    live.stop()


@pytest.fixture
def saves_fail(saving_server: LiveServer) -> Iterator[Path]:
    """The output folder gone, and its parent a regular file, as when a volume is unmounted or
    replaced: every save fails (ENOTDIR), whoever the tests run as (root ignores permissions)."""
    out = saving_server.settings.output_dir
    mount = out.parent
    shutil.rmtree(mount)
    mount.write_bytes(b"not a folder")
    yield mount
    mount.unlink()
    out.mkdir(parents=True)


def test_a_failed_save_still_answers_the_image_with_the_reason(saving_server, saves_fail, caplog):
    caplog.set_level(logging.WARNING)
    with saving_server.client() as c:
        r = c.post("/generate", json={**FAST, "save_to_file": True})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert body["status"] == "success" and body["file_path"] is None
        assert body["save_error"]["type"] == "save_failed" and body["save_error"]["code"] == "ENOTDIR"
        assert "Not a directory" in body["save_error"]["message"]
        assert str(saves_fail) not in r.text  # no server path to the client
        image = base64.b64decode(body["b64_json"])
        assert Image.open(io.BytesIO(image)).size == (body["width"], body["height"]) == (512, 512)
        # The very image the request made: the same request without save_to_file gives its bytes.
        assert c.post("/generate", json=FAST).content == image
    failures = [rec for rec in caplog.records if "saving its image failed" in rec.getMessage()]
    assert len(failures) == 1 and "Not a directory" in failures[0].getMessage()  # once, with its cause


def test_a_job_whose_save_fails_succeeds_with_its_image_and_the_reason(saving_server, saves_fail):
    with saving_server.client() as c:
        job = finished_job(c, {**FAST, "save_to_file": True})
        assert job["status"] == "succeeded" and job["error"] is None, job
        assert job["file_path"] is None
        assert job["save_error"]["type"] == "save_failed" and job["save_error"]["code"] == "ENOTDIR"
        r = c.get(job["image_url"])
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (512, 512)


@pytest.fixture
def disk_fills_at_64k() -> Iterator[None]:
    """This process (the server's) may write no file past 64 KiB: a save gets that far and then
    fails, as on a disk that fills during the write (EFBIG stands in for ENOSPC). The PNG is
    larger; nothing else the test process writes meanwhile is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_save_cut_short_leaves_no_temp_file_and_no_partial_image(saving_server, disk_fills_at_64k):
    out = saving_server.settings.output_dir
    with saving_server.client() as c:
        r = c.post("/generate", json={**FAST, "save_to_file": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["file_path"] is None and body["save_error"]["code"] == "EFBIG"
        assert len(base64.b64decode(body["b64_json"])) > 64 * 1024  # the whole image, not the cut one
        job = finished_job(c, {**FAST, "save_to_file": True})
        assert job["status"] == "succeeded" and job["save_error"]["code"] == "EFBIG"
    assert temp_files(out) == [] and list(out.glob("*.png")) == []


# -- retention ----------------------------------------------------------------------------------

def saved_file(folder: Path, name: str, age_s: float, size: int) -> Path:
    path = folder / name
    with open(path, "wb") as fh:
        fh.truncate(size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_the_sweep_deletes_old_images_beyond_the_limits_and_crash_leftovers(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mb = 2**20
    expired = saved_file(out, "Qwen-Image-20240101_000000-req1.png", 3 * 3600, mb)
    over_budget = saved_file(out, "Qwen-Image-20240101_000000-req2.png", 1800, 4 * mb)
    kept = [saved_file(out, "Qwen-Image-20240101_000000-req3.png", 1200, 4 * mb),
            saved_file(out, "Qwen-Image-20240101_000000-req4-1234-ab12cd34.png", 600, 4 * mb)]
    # Not the server's names: an operator's files stay, however old.
    kept += [saved_file(out, "holiday.png", 3 * 3600, mb), saved_file(out, "Qwen-Image-notes.txt", 3 * 3600, 10)]
    crashed = saved_file(out, ".Qwen-Image-20240101_000000-req5.png.0123456789abcdef0123456789abcdef.tmp",
                         3600, 1000)
    # A temp file this young may be another server's save in progress.
    kept.append(saved_file(out, ".Qwen-Image-20240101_000000-req6.png.00112233445566778899aabbccddeeff.tmp",
                           0, 1000))

    live = server(output_retention_s=3600, output_max_bytes=10 * mb, output_sweep_interval_s=0.2)
    # Swept before the server answered anything: what expired while it was down, past the
    # budget (12 MiB of images in 10: the oldest goes), and the temp file of a crashed save.
    for gone in (expired, over_budget, crashed):
        assert not gone.exists(), gone.name
    assert all(path.exists() for path in kept)

    # A running server keeps sweeping: its own save is deleted once it is past the retention.
    with live.client() as c:
        saved = Path(c.post("/generate", json={**FAST, "save_to_file": True}).json()["file_path"])
    assert saved.exists() and saved.parent == out
    old = time.time() - 2 * 3600
    os.utime(saved, (old, old))
    wait_until(lambda: not saved.exists(), 30, "the periodic sweep to delete the expired image")
    assert all(path.exists() for path in kept)


def test_without_retention_settings_saved_images_are_kept(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ancient = saved_file(out, "Qwen-Image-20200101_000000-req1.png", 5 * 365 * 86400, 1000)
    server()
    assert ancient.exists()


# -- save_atomically ----------------------------------------------------------------------------

def test_without_hard_links_a_save_never_replaces_another_file(tmp_path, monkeypatch):
    def no_links(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")  # as on FAT, exFAT, some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    first = save_atomically(b"first", tmp_path, "Qwen-Image-20240101_000000-req1.png")
    second = save_atomically(b"second", tmp_path, "Qwen-Image-20240101_000000-req1.png")
    assert first != second
    assert first.read_bytes() == b"first" and second.read_bytes() == b"second"
    assert temp_files(tmp_path) == []


def test_a_clash_of_the_suffix_too_still_saves(tmp_path, monkeypatch):
    name = "Qwen-Image-20240101_000000-req1.png"
    suffixes = iter(["aaaa0000", "aaaa0000", "bbbb1111"])
    real = render.secrets.token_hex
    monkeypatch.setattr(render.secrets, "token_hex", lambda n=None: real(n) if n and n > 4 else next(suffixes))
    (tmp_path / name).write_bytes(b"another process's")
    (tmp_path / f"Qwen-Image-20240101_000000-req1-{os.getpid()}-aaaa0000.png").write_bytes(b"a third's")
    path = save_atomically(b"mine", tmp_path, name)
    assert path.name == f"Qwen-Image-20240101_000000-req1-{os.getpid()}-bbbb1111.png"
    assert path.read_bytes() == b"mine" and (tmp_path / name).read_bytes() == b"another process's"


def test_a_name_planted_at_the_temp_path_is_never_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    monkeypatch.setattr(render.secrets, "token_hex", lambda n=None: "0" * 2 * (n or 32))
    name = "Qwen-Image-20240101_000000-req1.png"
    for size in (4, 16):  # whatever length the temp name's random part has
        planted = tmp_path / f".{name}.{'0' * 2 * size}.tmp"
        planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        save_atomically(b"attacker-chosen bytes", tmp_path, name)
    assert victim.read_bytes() == b"precious" and not (tmp_path / name).exists()


def test_the_folder_is_fsynced_after_the_save(tmp_path, monkeypatch):
    synced: list[bool] = []  # per fsync: was it a folder
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_atomically(b"png", tmp_path, "Qwen-Image-20240101_000000-req1.png")
    assert synced == [False, True]  # the file's data, then the folder's new entry
