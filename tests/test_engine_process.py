"""Engine processes behind one front, on the tiny model: a batch held inside an engine process,
an engine killed in the middle of a batch, a job that crashes two engines, cancellation across the
boundary, and the startup checks (more engines than GPUs, an output folder that cannot be
written).

One front with two engine processes is shared by the module (each engine costs a model load);
`tests/engine_loaders.py` is the seam into the engine processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from qwen_image_server.api.app import create_app
from qwen_image_server.config.checks import engine_gpus
from qwen_image_server.engine.process import engine_factories, pinned_device
from qwen_image_server.errors import ConfigurationError
from tests.conftest import LiveServer, free_port, server_env, tiny_settings, wait_until
from tests.engine_loaders import CRASH, GatedLoader
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.xdist_group("engine-process")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = {"num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}


class Front:
    """The module's server: two engine processes behind one in-process front, and the gate that
    holds their denoising steps."""

    def __init__(self, live: LiveServer, gate: Path) -> None:
        self.live = live
        self.gate = gate

    @property
    def url(self) -> str:
        return self.live.url

    def info(self) -> dict:
        return httpx.get(f"{self.url}/info", timeout=30).json()

    def engines(self) -> list[dict]:
        return self.info()["engines"]

    def held(self) -> list[Path]:
        return sorted(self.gate.parent.glob(f"{self.gate.name}.held-*"))

    def close_gate(self, *pids: int) -> None:
        """Hold the denoising steps of the engines with these process ids (of every engine: none)."""
        self.gate.write_text(" ".join(str(pid) for pid in pids))

    def open_gate(self) -> None:
        self.gate.unlink(missing_ok=True)

    def wait_serving(self, restarts: dict[int, int] | None = None) -> None:
        def serving() -> bool:
            engines = self.engines()
            return all(e["state"] in ("idle", "busy") for e in engines) and all(
                engines[i]["restarts"] == n for i, n in (restarts or {}).items())

        wait_until(serving, 180, f"every engine to serve (restarts {restarts})", interval=0.2)


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("engine-process")
    gate = tmp / "gate"
    settings = tiny_settings(tmp, engine_restart_backoff_s=0.05, max_batch_size=2)
    app = create_app(settings, engines=engine_factories(settings, [None, None], GatedLoader(gate)))
    live = LiveServer(app).start()
    server = Front(live, gate)
    server.wait_serving()
    yield server
    server.open_gate()
    pids = [e["pid"] for e in server.engines()]
    live.stop()
    # Stopping the front stops its engines (and reaps them: no zombie either).
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_each_engine_is_a_process_of_its_own_on_the_one_queue(front):
    info = front.info()
    assert info["workers"] == 2 and [e["index"] for e in info["engines"]] == [0, 1]
    pids = {e["pid"] for e in info["engines"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert info["model_loaded"] and info["total_parameters"] > 0  # the front knows the model


def test_a_batch_held_in_an_engine_process_shows_running_and_the_other_engine_serves(front):
    front.close_gate()
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, f"{front.url}/generate", json={"prompt": "held", **FAST},
                               timeout=120)
            wait_until(lambda: front.held(), 60, "a step to wait inside an engine process")
            busy = [e for e in front.engines() if e["busy"]]
            assert len(busy) == 1 and front.held()[0].name.endswith(f"-{busy[0]['pid']}")
            # Only that engine stays held; the other one serves a request meanwhile.
            front.close_gate(busy[0]["pid"])
            other = httpx.post(f"{front.url}/generate", json={"prompt": "other", **FAST}, timeout=120)
            assert other.status_code == 200 and not held.done()  # served while the first is still held
            assert other.headers["X-Engine"] != str(busy[0]["index"])
            front.open_gate()
            answer = held.result(120)
    finally:
        front.open_gate()
    assert answer.status_code == 200 and answer.content.startswith(PNG_MAGIC)
    assert answer.headers["X-Engine"] == str(busy[0]["index"])


def test_killing_an_engine_mid_batch_loses_no_job_and_the_engine_comes_back(front):
    before = {e["index"]: e["restarts"] for e in front.engines()}
    front.close_gate()
    try:
        with httpx.Client(base_url=front.url, timeout=60) as c:
            running = [c.post("/v1/jobs", json={"prompt": f"running {i}", "seed": i, **FAST}).json()
                       for i in range(2)]
            wait_until(lambda: len(front.held()) == 2, 60, "both engines to hold a step")
            queued = [c.post("/v1/jobs", json={"prompt": f"queued {i}", "seed": 10 + i, **FAST}).json()
                      for i in range(6)]
            assert front.info()["scheduler"]["queue_length"] == 6
            victim = front.engines()[0]
            assert victim["busy"]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_until(lambda: front.engines()[0]["restarts"] == before[0] + 1, 30,
                       "the front to notice the dead engine")
            front.open_gate()

            def status(job: dict) -> dict:
                return c.get(f"/v1/jobs/{job['id']}").json()

            jobs = running + queued
            wait_until(lambda: all(status(j)["status"] in ("succeeded", "failed") for j in jobs), 180,
                       "every job to finish")
            finals = [status(j) for j in jobs]
            assert [f["status"] for f in finals] == ["succeeded"] * 8, finals
            images = [c.get(f"/v1/jobs/{j['id']}/image") for j in jobs]
            assert all(r.status_code == 200 and r.content.startswith(PNG_MAGIC) for r in images)
            front.wait_serving(restarts={0: before[0] + 1})
            assert front.engines()[0]["pid"] != victim["pid"]
            m = scrape(c)
    finally:
        front.open_gate()
    assert value(m, "qwen_image_engine_restarts_total", engine="0") == before[0] + 1
    assert value(m, "qwen_image_engine_up", engine="0", gpu="") == 1


def test_a_job_that_crashes_two_engines_gets_500_and_the_next_request_succeeds(front):
    front.wait_serving()
    before = sum(e["restarts"] for e in front.engines())
    crashed = httpx.post(f"{front.url}/generate", json={"prompt": f"{CRASH} now", **FAST}, timeout=180)
    assert crashed.status_code == 500, crashed.text
    assert crashed.json()["error"]["type"] == "inference_error"
    fine = httpx.post(f"{front.url}/generate", json={"prompt": "a cat", **FAST}, timeout=180)
    assert fine.status_code == 200 and fine.content.startswith(PNG_MAGIC)
    assert sum(e["restarts"] for e in front.engines()) == before + 2
    assert httpx.get(f"{front.url}/health").status_code == 200


def test_a_cancel_crosses_to_the_engine_process(front):
    front.wait_serving()
    front.close_gate()
    try:
        with httpx.Client(base_url=front.url, timeout=60) as c:
            job = c.post("/v1/jobs", json={"prompt": "cancel me", **{**FAST, "num_inference_steps": 50}}).json()
            wait_until(lambda: front.held(), 60, "the job's first step in its engine")
            assert c.delete(f"/v1/jobs/{job['id']}").status_code == 200
            front.open_gate()
            wait_until(lambda: c.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled", 60,
                       "the job to be cancelled")
            # The engine stopped at its next step, so it is free for the next job long before
            # 50 steps could have run; the next job runs on it.
            wait_until(lambda: not any(e["busy"] for e in front.engines()), 60, "the engine to be free")
            assert c.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] <= 2
    finally:
        front.open_gate()


def test_an_edit_crosses_with_its_input_image(front, tiny_server):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "PNG")
    body = {"prompt": "make it night", "num_inference_steps": "2", "add_overlay": "false", "seed": "7"}
    edited = httpx.post(f"{front.url}/edit", timeout=300, files=[("image", ("a.png", buf.getvalue(), "image/png"))],
                        data=body)
    assert edited.status_code == 200, edited.text
    assert Image.open(io.BytesIO(edited.content)).size == (256, 256)
    # The same edit on a server whose engine runs inside it: the same image (up to the rounding
    # of another thread count), so the input image crossed whole.
    local = httpx.post(f"{tiny_server.url}/edit", timeout=300,
                       files=[("image", ("a.png", buf.getvalue(), "image/png"))], data=body)
    assert local.status_code == 200

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    assert np.abs(pixels(local.content) - pixels(edited.content)).max() <= 2


def test_more_engines_than_gpus_is_an_error_naming_both_numbers(tmp_path):
    settings = tiny_settings(tmp_path, workers=3, device="auto")
    with pytest.raises(ConfigurationError) as refused:
        engine_gpus(settings, gpus=2)
    assert "WORKERS=3" in str(refused.value) and "2 GPUs" in str(refused.value)
    assert engine_gpus(tiny_settings(tmp_path, workers="auto"), gpus=2) == [0, 1]
    assert engine_gpus(tiny_settings(tmp_path, workers=2), gpus=4) == [0, 1]
    assert engine_gpus(tiny_settings(tmp_path, workers=3), gpus=0) == [None] * 3  # the CPU
    assert engine_gpus(tiny_settings(tmp_path, workers="auto"), gpus=0) == [None]


def test_workers_is_a_count_or_auto_with_one_error_otherwise(tmp_path):
    from pydantic import ValidationError

    for bad in (0, "two"):
        with pytest.raises(ValidationError) as refused:
            tiny_settings(tmp_path, workers=bad)
        [error] = refused.value.errors()
        assert error["loc"] == ("workers",) and "'auto'" in error["msg"]


def test_each_engine_is_pinned_to_its_own_gpu_among_those_the_front_sees():
    assert [pinned_device(i, None) for i in range(2)] == ["0", "1"]
    assert [pinned_device(i, "2,3") for i in range(2)] == ["2", "3"]
    assert pinned_device(0, "GPU-8f1c, GPU-77aa") == "GPU-8f1c"


def test_the_app_refuses_more_engines_than_the_gpus_torch_counts(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigurationError, match="WORKERS=2 asks for 2 engines, but this machine has 1 GPU "):
        create_app(tiny_settings(tmp_path, workers=2, device="auto"))


def test_an_output_folder_that_cannot_be_written_stops_the_server_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**server_env(free_port()), "QWEN_IMAGE_OUTPUT_DIR": str(blocker / "out")}
    done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "QWEN_IMAGE_OUTPUT_DIR" in lines[0] and str(blocker) in lines[0], done.stderr


FRONT_ONLY = """
import sys
from pathlib import Path

import httpx

from qwen_image_server.api.app import create_app
from qwen_image_server import cli
from qwen_image_server.launch import http
from tests.conftest import LiveServer, tiny_settings

live = LiveServer(create_app(tiny_settings(Path(sys.argv[1])))).start()
fast = {"num_inference_steps": 2, "aspect_ratio": "s1:1"}
image = httpx.post(f"{live.url}/generate", json={"prompt": "a cat", **fast}, timeout=120)
too_long = httpx.post(f"{live.url}/generate", json={"prompt": "cat" + " cat" * 1100, **fast}, timeout=60)
live.stop()
heavy = sorted({name.split(".")[0] for name in sys.modules}
               & {"diffusers", "transformers", "peft", "torchao", "cache_dit", "accelerate", "ray"})
print(image.status_code, image.headers["content-type"], too_long.status_code, too_long.json()["error"]["code"],
      heavy)
"""


PRELOAD_CHECK = """
import threading

import torch

# CUDA made to look present, and its one way to start recorded: what the preload would do on a GPU.
started = []
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda._lazy_init = lambda: started.append("cuda")

import qwen_image_server.engine.preload

print(started, threading.active_count(), "diffusers" in __import__("sys").modules)
"""


def test_the_engines_fork_server_imports_the_model_libraries_without_starting_cuda():
    """Engines are forked from a server that imported torch and diffusers once. A process forked
    after CUDA started could not use its GPU, nor pin one: so the preload must never start CUDA,
    even where CUDA is present, and must leave no thread running that a fork would cut."""
    done = subprocess.run([sys.executable, "-c", PRELOAD_CHECK], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split("\n")[-2] == "[] 1 True", done.stdout


def test_the_front_imports_no_model_library_and_still_counts_prompt_tokens(tmp_path):
    """A front whose engines are processes (the default) never imports diffusers, transformers,
    peft or ray: it starts in a second or two, not six, and holds none of their memory. It still
    refuses a prompt over the model's token limit before queueing it, with the engine's tokenizer
    (its Rust half crosses the pipe)."""
    done = subprocess.run([sys.executable, "-c", FRONT_ONLY, str(tmp_path)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split("\n")[-2] == "200 image/png 400 too_many_tokens []", done.stdout


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_2_is_one_front_two_engines_and_the_engines_die_with_the_front(spawn):
    """`qwen-image serve` with WORKERS=2, as the README starts it: one front process owns the
    queue, the jobs and /metrics; a kill -9 of the front takes its engines with it."""
    server = spawn(WORKERS="2").wait_ready()
    wait_until(lambda: all(e["state"] == "idle" for e in httpx.get(f"{server.url}/info").json()["engines"]),
               180, "both engines to load", interval=0.25)
    body = {"prompt": "a cat", "num_inference_steps": 6, "add_overlay": False}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: httpx.post(f"{server.url}/generate", json={**body, "seed": i},
                                                     timeout=300), range(8)))
    assert all(r.status_code == 200 and r.content.startswith(PNG_MAGIC) for r in answers)
    assert {r.headers["X-Engine"] for r in answers} == {"0", "1"}  # both engines served

    with httpx.Client(base_url=server.url, timeout=30) as c:
        job = c.post("/v1/jobs", json={"prompt": "a dog", "num_inference_steps": 2}).json()
        wait_until(lambda: c.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 120, "the job")
        # A new connection each time: under several Gunicorn workers, about half went elsewhere.
        lookups = [httpx.get(f"{server.url}/v1/jobs/{job['id']}").status_code for _ in range(50)]
        lookups += [httpx.get(f"{server.url}/v1/jobs/{job['id']}/image").status_code for _ in range(50)]
        assert lookups == [200] * 100
        info = c.get("/info").json()
        m = scrape(c)
    assert info["workers"] == 2 and [e["batches"] for e in info["engines"]] != [0, 0]
    assert sum(e["batches"] for e in info["engines"]) == 9 == info["scheduler"]["batches"]
    for engine in info["engines"]:
        assert value(m, "qwen_image_engine_up", engine=str(engine["index"]), gpu="") == 1
        assert value(m, "qwen_image_engine_batches_total", engine=str(engine["index"])) == engine["batches"]

    engines = [e["pid"] for e in info["engines"]]
    [front] = re.findall(r"Booting worker with pid: (\d+)", server.output())  # Gunicorn's one worker
    assert server.proc.pid not in engines and int(front) not in engines
    os.kill(int(front), signal.SIGKILL)
    wait_until(lambda: not any(_running(pid) for pid in engines), 10, "the engines to exit after their front")

    def fronts_booted() -> int:
        return sum("Booting worker with pid" in line for line in server.output().splitlines())

    # Gunicorn boots a new front in its place (said at the fork, before any model loads).
    wait_until(lambda: fronts_booted() == 2, 30, "Gunicorn to start a new front")
    # The new front loads two new engines; nothing is left to check, so the whole process group
    # goes at once rather than through a drain of a loading front.
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
