"""The server as users run it: start script, `qwen-image serve` under Gunicorn, Gunicorn by hand,
the CLI, settings from flags / variables / .env, SIGTERM drain, Ctrl+C, a busy port, a model that
cannot load, and the example clients."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import (
    ROOT,
    ServerProcess,
    free_port,
    hold_engine,
    run_cli,
    server_env,
    start_process,
    wait_until,
)
from tests.dying_app import DIE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_silent_client_cut(server: ServerProcess, deadline: float) -> None:
    """A client that sends one byte of a request and nothing more is closed at the read deadline
    (tests/test_slow_clients.py attacks it in depth); the front logged its open-file limit."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=deadline + 10) as sock:
        sock.sendall(b"G")
        sent = time.monotonic()
        assert sock.recv(100) == b""
        assert deadline - 0.1 <= time.monotonic() - sent <= deadline + 5
    assert "open-file limit: " in server.output()


@pytest.fixture(scope="module")
def script_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    """`bash start_server.sh` as the README starts it, shared by the tests that only use it; it
    must then stop cleanly on SIGTERM."""
    cwd = tmp_path_factory.mktemp("start-script")
    server = start_process(cwd, cmd=["bash", str(ROOT / "start_server.sh")]).wait_ready()
    yield server, cwd
    assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output()


@pytest.mark.xdist_group("start-script")
def test_start_script_serves_the_seed_api_and_health_answers_in_milliseconds_meanwhile(script_server):
    server, cwd = script_server
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "healthy" and health["model_loaded"] is True
    with ThreadPoolExecutor(1) as pool:
        # The README's first request: a large image (the one the tiny model makes end to end;
        # the other presets are checked on a fake engine in test_api.py).
        large = pool.submit(httpx.post, f"{server.url}/generate", timeout=300, json={
            "prompt": "A cute cat sitting on a windowsill", "aspect_ratio": "16:9", "save_to_file": True,
            "num_inference_steps": 2})
        server.wait_running(what="the large image to start")
        latencies = []
        during = 0  # probes answered while the image was still being made
        with httpx.Client(base_url=server.url, timeout=10) as c:
            # Probes 20 times a second, like a busy load balancer, leaving the cores to the image.
            while not large.done() or len(latencies) < 5:
                start = time.perf_counter()
                assert c.get("/health").json()["status"] == "healthy"
                latencies.append(time.perf_counter() - start)
                during += not large.done()
                time.sleep(0.05)
        body = large.result().json()
    assert body["file_path"].startswith("tmp/Qwen-Image-") and (body["width"], body["height"]) == (1664, 928)
    assert Image.open(cwd / body["file_path"]).size == (1664, 928)
    # A bound generous enough for a loaded CI machine; bench/scheduler_bench.py --health-only
    # measures the real figure (about a millisecond, idle or busy).
    assert during >= 5, (during, latencies)  # the probes overlapped the image, not only followed it
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.25, latencies  # median
    assert latencies[-1] < 2.0, latencies


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(spawn):
    server = spawn().wait_ready()
    with ThreadPoolExecutor(4) as pool:
        # A long first job keeps the engine busy while three more arrive: /info shows them queued
        # (not already done) when SIGTERM comes, or the test fails saying so.
        running = pool.submit(httpx.post, f"{server.url}/generate", timeout=300, json={
            "prompt": "drain 0", "num_inference_steps": 10})
        server.wait_running()
        queued = [pool.submit(httpx.post, f"{server.url}/generate", timeout=300, json={
            "prompt": f"drain {i}", "seed": i, "num_inference_steps": 2}) for i in range(1, 4)]
        server.wait_scheduler("three queued jobs behind a running one",
                              queue_length=3, running_batch_size=1, processed=0)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "/ready to turn 503")
        refused = httpx.post(f"{server.url}/generate", json={"prompt": "too late"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        results = [running.result()] + [f.result() for f in queued]
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.content.startswith(PNG_MAGIC) for r in results)
    assert server.proc.wait(60) == 0


def test_drain_timeout_fails_what_is_left_and_exits_0(server):
    live = server(drain_timeout_s=1.0)
    body = {"prompt": "never finished", "num_inference_steps": 2}
    with ThreadPoolExecutor(2) as pool, hold_engine(live) as hook:
        running = pool.submit(httpx.post, f"{live.url}/generate", json=body, timeout=120)
        live.wait_running()
        queued = pool.submit(httpx.post, f"{live.url}/generate", json=body, timeout=120)
        live.wait_scheduler("a queued job", queue_length=1)
        live.server.handle_exit(signal.SIGTERM, None)  # what the SIGTERM handler does
        drain_started = time.monotonic()
        # The engine is still held, so only the drain timeout can answer the queued request.
        left = queued.result(60)
        assert time.monotonic() - drain_started >= 1.0
        assert left.status_code == 503 and left.json()["error"]["type"] == "shutting_down"
        hook.release()  # the running batch stops at its next step
        cut = running.result(60)
    assert cut.status_code == 503 and cut.json()["error"]["type"] == "shutting_down"
    live.thread.join(30)
    assert not live.thread.is_alive() and live.server.exit_code() == 0


def test_settings_from_flags_variables_and_dotenv_then_a_second_ctrl_c_exits_at_once(spawn, tmp_path):
    # One server start for two promises about `qwen-image serve`: how it reads its settings, and
    # how it stops.
    key = "cli-key-2b7c"
    (tmp_path / ".env").write_text(
        "QWEN_IMAGE_DEFAULT_STEPS=3\nQWEN_IMAGE_MAX_QUEUE=9\nQWEN_IMAGE_QUEUE_TIMEOUT_S=111\n")
    server = spawn("--api-key", key, "--max-queue", "7", "--request-read-timeout-s", "1", QWEN_IMAGE_MAX_QUEUE="5",
                   QWEN_IMAGE_QUEUE_TIMEOUT_S="321").wait_ready()
    assert_silent_client_cut(server, 1.0)
    assert httpx.get(f"{server.url}/info").status_code == 401
    auth = server.headers = {"Authorization": f"Bearer {key}"}
    info = httpx.get(f"{server.url}/info", headers=auth).json()
    assert info["scheduler"]["max_queue"] == 7  # the flag, over the variable and .env
    assert info["scheduler"]["queue_timeout_s"] == 321  # the variable, over .env
    assert info["defaults"]["num_inference_steps"] == 3  # QWEN_IMAGE_DEFAULT_STEPS from .env
    job = httpx.post(f"{server.url}/v1/jobs", headers=auth, json={"prompt": "a cat"}).json()
    assert job["progress"]["total"] == 3  # a request that leaves steps out gets the default
    wait_until(lambda: httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=auth).json()["status"]
               == "succeeded", 120, "the job to finish")

    with ThreadPoolExecutor(1) as pool:
        long_job = pool.submit(httpx.post, f"{server.url}/generate", timeout=300, headers=auth, json={
            "prompt": "a long job", "aspect_ratio": "1:1", "num_inference_steps": 100})
        server.wait_running(what="the long job to run")
        os.killpg(server.proc.pid, signal.SIGINT)  # Ctrl+C reaches every process of the terminal's group
        wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "the drain to start")
        assert server.scheduler()["running_batch_size"] == 1  # the first Ctrl+C waits for it
        os.killpg(server.proc.pid, signal.SIGINT)
        second = time.monotonic()
        code = server.proc.wait(60)
        stopped_after = time.monotonic() - second
        try:
            answer = long_job.result(60)
        except httpx.HTTPError:
            answer = None  # the connection closed: a forced exit may not answer
    assert answer is None or answer.status_code != 200  # the 100-step 1328x1328 job did not finish
    assert stopped_after < 30, stopped_after
    assert code == 0 and "Traceback" not in server.output(), (code, server.output()[-2000:])


def test_gunicorn_by_hand_runs_the_front_which_restarts_an_engine_whose_device_died(spawn):
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    server = spawn(cmd=[gunicorn, "-c", str(ROOT / "gunicorn_config.py"), "tests.dying_app:create_app()"],
                   PYTHONPATH=str(ROOT), QWEN_IMAGE_ENGINE_RESTART_BACKOFF_S="0.1",
                   QWEN_IMAGE_REQUEST_READ_TIMEOUT_S="1").wait_ready()
    assert_silent_client_cut(server, 1.0)  # the worker class applies the settings too
    fast = {"num_inference_steps": 2, "add_overlay": False}
    assert httpx.post(f"{server.url}/generate", json={"prompt": "a cat", **fast}, timeout=120).status_code == 200
    first_engine = httpx.get(f"{server.url}/info").json()["engines"][0]["pid"]
    # The device fails under this job: its engine process ends and the front starts a new one; the
    # job is retried once, fails its device again, and only then gets an error.
    dead = httpx.post(f"{server.url}/generate", json={"prompt": DIE, **fast}, timeout=300)
    assert dead.status_code == 500 and dead.json()["error"]["type"] == "inference_error"
    assert httpx.post(f"{server.url}/generate", json={"prompt": "a cat", **fast}, timeout=300).status_code == 200
    engine = httpx.get(f"{server.url}/info").json()["engines"][0]
    assert engine["restarts"] == 2 and engine["pid"] != first_engine
    booted = [line for line in server.output().splitlines() if "Booting worker with pid" in line]
    assert len(booted) == 1, server.output()  # the front itself never restarted
    assert server.stop() == 0


def test_busy_port_is_a_one_line_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path,
                              env=server_env(port), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} is already in use" in lines[0] and "PORT=" in lines[0]


def test_bad_settings_are_one_line_each_naming_the_variable(tmp_path):
    env = {**server_env(free_port()), "QWEN_IMAGE_MAX_QUEUE": "abc", "QWEN_IMAGE_QUANTIZE": "fp16"}
    done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("qwen-image: invalid setting ") for line in lines), done.stderr
    assert any("QWEN_IMAGE_MAX_QUEUE" in line and "'abc'" in line for line in lines)
    assert any("QWEN_IMAGE_QUANTIZE" in line and "'fp16'" in line and "'int8'" in line for line in lines)


def test_a_model_folder_that_is_not_there_is_one_line_before_anything_loads(tmp_path):
    missing = tmp_path / "no-such-model"
    env = {**server_env(free_port()), "QWEN_IMAGE_MODEL": f"tiny,edit={missing}"}
    done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: QWEN_IMAGE_MODEL: "), done.stderr
    assert f"'{missing}'" in lines[0] and "does not exist" in lines[0] and "model_index.json" in lines[0]


def test_model_that_cannot_load_exits_with_a_paragraph_not_a_traceback(spawn, tmp_path):
    # A pipeline folder, but of a pipeline this server does not run: found only by the loader,
    # after the server has started.
    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageControlNetPipeline"}))
    server = spawn(QWEN_IMAGE_MODEL=str(folder))
    assert server.proc.wait(180) != 0
    out = server.output()
    assert f"Could not load the model '{folder}'" in out and "QwenImageControlNetPipeline" in out
    assert "QWEN_IMAGE_MODEL" in out  # says what to do
    assert "Traceback" not in out


def test_generate_cli_writes_one_image_without_a_server(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert run_cli("generate", "a cat", "--aspect-ratio", "s1:1", "--out", str(out), "--num-inference-steps", "2",
                   "--add-overlay", "--output-dir", str(tmp_path)) == 0
    # The large presets are made end to end once (the start script test); here the CLI's own flags.
    assert Image.open(out).size == (512, 512)
    assert f"saved {out} (512x512" in capsys.readouterr().out


@pytest.mark.xdist_group("start-script")
def test_example_clients_run_against_a_server(script_server, tmp_path):
    server, _ = script_server
    for script, extra in (("test_client.py", ["--steps", "2", "--out", str(tmp_path / "t.png")]),
                          ("test_concurrent.py", ["--steps", "2", "-n", "2"])):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--url", server.url, *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "Speedup from concurrency" in done.stdout
    assert Image.open(io.BytesIO((tmp_path / "t.png").read_bytes())).size == (512, 512)


def test_generate_cli_talks_to_a_running_server_with_a_progress_bar(tiny_server, tmp_path, capsys):
    assert run_cli("generate", "a cat", "--url", tiny_server.url, "--out", str(tmp_path / "remote.png"),
                   "--num-inference-steps", "3", "--seed", "5") == 0
    assert "3/3" in capsys.readouterr().err  # the progress bar reached the last step
    local = httpx.post(f"{tiny_server.url}/generate", timeout=120, json={
        "prompt": "a cat", "num_inference_steps": 3, "seed": 5, "add_overlay": False})
    assert (tmp_path / "remote.png").read_bytes() == local.content
