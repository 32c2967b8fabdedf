"""Shared fixtures: a real server on a real socket, in-process (fast, inspectable) or as a
subprocess (for signals, exit codes and the start scripts).

Tests reach a live server through its public API: they wait on `/info`'s `scheduler` block, and
the one seam into the engine is `EngineHook` (`hold_engine`, `live.hook.fail_next`), which
wraps whatever engine the server loads instead of patching the model's modules.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from qwen_image_server.api.app import create_app, real_engine_factory
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import Engine
from qwen_image_server.engine.types import GenerationSpec, StepCallback, StepEvent
from qwen_image_server.launch.connection_limits import bound_connections
from qwen_image_server.launch.http import GracefulServer, app_settings

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 180.0
HOLD_LIMIT = 120.0  # s: a held engine that nobody releases fails its batch instead of hanging


# Under `--dist loadgroup` (run_tests.sh) the tests of one xdist_group run on one worker. Every
# Ray file joins one group: two Ray clusters at once do not fit on a small machine. The engine
# option tests share module-scoped models, and so do the other files named here: each file's
# module fixtures (servers, models, a browser) are started once, on one worker. (A file may also
# carry its own xdist_group mark.)
FILE_GROUPS = {name: name.removeprefix("test_").removesuffix(".py") for name in (
    "test_engine_options.py", "test_gpu_paths.py", "test_edit.py", "test_web_edit.py",
    "test_uploads.py", "test_models.py", "test_openai.py")}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        group = "ray" if name.startswith("test_ray") else FILE_GROUPS.get(name)
        if group and not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item: pytest.Item) -> None:
    # loadgroup keeps a group on one worker only through the "@group" suffix pytest-xdist adds to
    # each node id; a pytest that keeps node ids elsewhere drops it silently, and every worker
    # would then start its own copy of each module's servers and models. Fail instead.
    if (getattr(item.config.option, "loadgroup", False) and any(item.iter_markers("xdist_group"))
            and "@" not in item.nodeid):
        pytest.fail("pytest-xdist did not keep this test's xdist_group on one worker: this pytest "
                    "and pytest-xdist do not work together; install requirements-test.txt's versions.")


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist every worker runs models at once: one torch thread each, or the workers
    # fight over the cores and all run slower than one process would.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        # The engine processes a worker's fronts start read it from the environment.
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def final_status(url: str, job_id: str, timeout: float = 180) -> dict:
    """The job's status once it has ended (succeeded, failed or cancelled), read over HTTP."""
    status: dict = {}

    def ended() -> bool:
        status.update(httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())
        return status.get("status") in ("succeeded", "failed", "cancelled")

    wait_until(ended, timeout, f"job {job_id} to end")
    return status


class EngineHook:
    """The test seam into a live server's engine, whatever it is (the tiny model or a fake).

    It wraps the engine the server loads. `hold()` makes every denoising step wait until
    `release()`: the batch is provably running (`/info` shows it) and everything sent meanwhile
    provably queued. `fail_next(...)` makes the next pipeline calls raise from inside the call, at
    their first step, as a failing model would; so the real engine's own error mapping (out of
    memory, a dead device, any other exception) is what the server sees.
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.calls: list[list[int]] = []  # the seeds of every pipeline call, retries included
        self.specs: list[GenerationSpec] = []  # every image the engine was asked for, in order
        self.steps: list[StepEvent] = []  # every step event the engine reported, previews included
        self.previewed = threading.Event()  # set when hold_after_next_preview has held the engine
        self._hold_after_preview = False
        self._open = threading.Event()
        self._open.set()
        self._faults: deque[BaseException | None] = deque()

    def wrap(self, load: Callable[[], Engine]) -> Callable[[], Engine]:
        def load_hooked() -> Engine:
            self.engine = load()
            return self

        return load_hooked

    def __getattr__(self, name: str):
        # model, free_memory, warm_up, ...: the server sees the engine it loaded.
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback):
        self.calls.append([spec.seed for spec in specs])
        self.specs.extend(specs)
        fault = self._faults.popleft() if self._faults else None

        def step(event: StepEvent) -> None:
            self._wait_open()
            if fault is not None:
                raise fault
            self.steps.append(event)
            on_step(event)
            if event.previews and self._hold_after_preview:
                # The server has the preview; the engine waits right after the step that made it.
                self._hold_after_preview = False
                self.hold()
                self.previewed.set()
                self._wait_open()

        return self.engine.run_batch(specs, step)

    def _wait_open(self) -> None:
        if not self._open.wait(HOLD_LIMIT):
            raise AssertionError("the test held the engine and never released it")

    def hold(self) -> None:
        self._open.clear()

    def hold_after_next_preview(self) -> None:
        """The engine waits (until `release()`) right after the next step that made a preview,
        once the server has that preview; `previewed` is set then."""
        self.previewed.clear()
        self._hold_after_preview = True

    def release(self) -> None:
        self._open.set()

    def fail_next(self, *faults: BaseException | None) -> None:
        """Faults for the next pipeline calls, in order; None lets that call run normally."""
        self._faults.extend(faults)

    def reset(self) -> None:
        self._faults.clear()
        self._hold_after_preview = False
        self.release()


class SchedulerView:
    """What a test reads of a running server's scheduler: `/info`'s `scheduler` block, the live
    numbers a user sees (no reaching into the process)."""

    url: str
    headers: dict[str, str] | None = None  # e.g. the API key of a server that has keys

    def scheduler(self) -> dict:
        r = httpx.get(f"{self.url}/info", headers=self.headers or {}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["scheduler"]

    def wait_scheduler(self, what: str, timeout: float = 60, **expected: int) -> dict:
        """Wait until `/info`'s scheduler numbers include `expected` (e.g. queue_length=3)."""
        seen: dict = {}

        def matches() -> bool:
            seen.update(self.scheduler())
            return all(seen[key] == value for key, value in expected.items())

        try:
            wait_until(matches, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; /info scheduler: {seen}") from None
        return seen

    def wait_running(self, jobs: int = 1, what: str = "the first job to run") -> dict:
        return self.wait_scheduler(what, running_batch_size=jobs)


class LiveServer(SchedulerView):
    """A real uvicorn server (GracefulServer) in a thread of this process, on a free port.

    Given settings, it builds the app with its engine (the tiny model unless `engine_factory`
    says otherwise) wrapped in `self.hook`. Given an app built elsewhere, it serves that app as
    it is, and `self.hook` is None. Its connections are bounded as the real server's are (read
    deadline, connection cap); `http` picks uvicorn's HTTP parser ("auto", "h11", "httptools").
    """

    def __init__(self, serve: Settings | FastAPI, engine_factory: Callable[[], Engine] | None = None,
                 http: str = "auto") -> None:
        self.hook: EngineHook | None = None
        self.settings: Settings | None = None  # what the test started it with (None: an app built elsewhere)
        if isinstance(serve, FastAPI):
            self.app = serve
        else:
            self.settings = serve
            self.hook = EngineHook()
            self.app = create_app(serve, engine_factory=self.hook.wrap(engine_factory or real_engine_factory(serve)))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http=http)
        bound_connections(config, app_settings(self.app))
        self.server = GracefulServer(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the server to listen")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if wait_ready:
            wait_until(self.is_ready, READY_TIMEOUT, "the model to load", interval=0.2)
        return self

    def is_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=30).status_code == 200
        except httpx.TimeoutException:
            # While the model loads, this process is busy building it: a slow answer on a
            # loaded machine means "not yet", not a failure.
            return False

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self) -> None:
        if self.hook is not None:
            self.hook.reset()
        self.server.should_exit = True
        self.thread.join(60)


@contextmanager
def hold_engine(live: LiveServer) -> Iterator[EngineHook]:
    """Every denoising step of `live` waits until the block ends (see EngineHook.hold)."""
    assert live.hook is not None, "hold_engine needs a LiveServer built from settings"
    live.hook.hold()
    try:
        yield live.hook
    finally:
        live.hook.release()


def tiny_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings for the embedded tiny model, output and state under tmp_path, nothing from the env.

    Batching is on (up to 4) although the CPU default is 1, so the tests exercise it."""
    values = dict(model="tiny", output_dir=tmp_path / "out", data_dir=tmp_path / "data", threads=2,
                  log_level="warning", max_batch_size=4)
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory) -> Iterator[LiveServer]:
    """One in-process server on the tiny model, shared by the tests that only send requests."""
    tmp = tmp_path_factory.mktemp("tiny-server")
    server = LiveServer(tiny_settings(tmp)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory) -> Iterator[LiveServer]:
    """One in-process server on a fake engine (instant solid-colour images), shared by the tests
    of what the API asks of the engine and answers, where the model's pixels are not at stake."""
    from tests.fakes import FakeEngine

    server = LiveServer(tiny_settings(tmp_path_factory.mktemp("fake-server")), FakeEngine).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The embedded tiny model, loaded straight with diffusers (not through the server): what
    tests compare the server's answers with."""
    from diffusers import QwenImagePipeline

    from qwen_image_server.engine.tiny import ensure_tiny_model

    cache = tiny_settings(tmp_path_factory.mktemp("tiny-pipeline")).cache_dir
    return QwenImagePipeline.from_pretrained(ensure_tiny_model(cache))


@pytest.fixture
def tiny_hook(tiny_server: LiveServer) -> Iterator[EngineHook]:
    """The shared server's engine hook, reset after the test (no fault or hold leaks out)."""
    yield tiny_server.hook
    tiny_server.hook.reset()


@pytest.fixture
def server(tmp_path: Path) -> Iterator:
    """Start private in-process servers with the settings a test chooses (counters start at zero,
    faults stay private), on the tiny model or `engine=` a fake; all are stopped at the end."""
    made: list[LiveServer] = []

    def start(engine: Callable[[], Engine] | None = None, wait_ready: bool = True, **settings) -> LiveServer:
        live = LiveServer(tiny_settings(tmp_path, **settings), engine).start(wait_ready)
        made.append(live)
        return live

    yield start
    for live in made:
        live.stop()


@pytest.fixture(scope="module")
def small_working_size():
    """The edit pipelines at a 128x128 working size instead of a megapixel: the tiny edit model's
    VAE then decodes in a second, not minutes (bfloat16 3-D convolutions on a CPU without AVX-512
    take several minutes at a megapixel)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as inpaint
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    real = inpaint.calculate_dimensions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plus, "VAE_IMAGE_SIZE", 128 * 128)
        patch.setattr(plus, "CONDITION_IMAGE_SIZE", 64 * 64)
        patch.setattr(inpaint, "calculate_dimensions", lambda area, ratio: real(128 * 128, ratio))
        yield


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    """A LoRA folder: tiny LoRAs for the generation and the edit model, a Lightning one, and three
    broken ones (not a file of tensors, a LoRA for another model, one PEFT cannot load)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file, save_file

    from qwen_image_server.engine.tiny import build_lora, ensure_tiny_edit_model, ensure_tiny_model

    folder = tmp_path_factory.mktemp("loras")
    cache = tiny_settings(folder).cache_dir
    tiny = QwenImageTransformer2DModel.from_pretrained(ensure_tiny_model(cache) / "transformer")
    edit = QwenImageTransformer2DModel.from_pretrained(ensure_tiny_edit_model(cache) / "transformer")
    build_lora(folder / "style.safetensors", tiny, base="Qwen-Image", seed=1)
    build_lora(folder / "ink.safetensors", tiny, base="Qwen-Image", rank=8, seed=2, targets=("to_q", "to_v"))
    build_lora(folder / "tiny-Lightning-4steps.safetensors", tiny, base="Qwen-Image", seed=3)
    build_lora(folder / "edit-style.safetensors", edit, base="Qwen-Image-Edit", seed=4)
    (folder / "notalora.safetensors").write_bytes(b"\x00" * 64)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(folder / "foreign.safetensors"))
    # Its last layer has rank 0: the header is a LoRA's, PEFT refuses it halfway through loading.
    weights = load_file(folder / "style.safetensors")
    last = sorted(key for key in weights if ".lora_A." in key)[-1]
    weights[last] = torch.zeros(0, weights[last].shape[1])
    partner = last.replace(".lora_A.", ".lora_B.")
    weights[partner] = torch.zeros(weights[partner].shape[0], 0)
    save_file(weights, str(folder / "broken.safetensors"))
    return folder


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's Chromium, headless, driven by Playwright (no browser download); the web tests skip
    with the reason where /usr/bin/chromium is missing (CI installs it)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        # launch() gives every context a fresh, throwaway profile.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def client(tiny_server: LiveServer) -> Iterator[httpx.Client]:
    with tiny_server.client() as c:
        yield c


def run_cli(*args: str) -> int:
    """`qwen-image <args>` in this process (where the subject is what the command does, not the
    process it runs in); its exit code."""
    from qwen_image_server.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


def open_request(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> socket.socket:
    """Send a JSON POST on a raw connection and return it unread: the test decides when the
    client goes away (close() is a disconnect at a moment the test chose, not a timeout)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
    return conn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess(SchedulerView):
    """`qwen-image serve` (or any command) as a subprocess with its own port and cwd."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = cwd / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the server's output, until stop()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, "the server to become ready", interval=0.25)
        return self

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def server_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_IMAGE_")}
    env.update(PORT=str(port), HOST="127.0.0.1", WORKERS="1", THREADS="2",
               QWEN_IMAGE_MODEL="tiny", PYTHONUNBUFFERED="1")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # as in pytest_configure: share the cores with the other test workers
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env.update(extra)
    return env


def start_process(cwd: Path, *args: str, cmd: list[str] | None = None, **env: str) -> ServerProcess:
    """`qwen-image serve *args` (or `cmd`) in `cwd` on a free port, with `env` on top of the
    test environment (no QWEN_IMAGE_* from outside)."""
    port = free_port()
    command = cmd or [sys.executable, "-m", "qwen_image_server", "serve", *args]
    return ServerProcess(command, cwd, server_env(port, **env), port)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Start `qwen-image serve` subprocesses in tmp_path; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, cmd: list[str] | None = None, **env: str) -> ServerProcess:
        proc = start_process(tmp_path, *args, cmd=cmd, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
