"""The server as users run it: start script, `qwen-image serve` under Gunicorn, the CLI,
SIGTERM drain, a busy port, a model that cannot load, and the example clients."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import threading

import httpx
from PIL import Image

from tests.conftest import ROOT, free_port, server_env, wait_until


def test_start_script_serves_the_seed_api_with_files_relative_to_cwd(spawn, tmp_path):
    server = spawn(cmd=["bash", str(ROOT / "start_server.sh")]).wait_ready()
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "healthy" and health["model_loaded"] is True
    r = httpx.post(f"{server.url}/generate", timeout=120, json={
        "prompt": "A cute cat sitting on a windowsill", "aspect_ratio": "16:9", "save_to_file": True,
        "num_inference_steps": 2})
    body = r.json()
    assert body["file_path"].startswith("tmp/Qwen-Image-") and (body["width"], body["height"]) == (1664, 928)
    assert Image.open(tmp_path / body["file_path"]).size == (1664, 928)
    assert server.stop() == 0
    assert "Traceback" not in server.output()


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(spawn):
    server = spawn().wait_ready()
    results: list[httpx.Response] = []

    def send(i: int) -> None:
        results.append(httpx.post(f"{server.url}/generate", timeout=300, json={
            "prompt": f"drain {i}", "seed": i, "num_inference_steps": 20}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def all_accepted() -> bool:
        s = httpx.get(f"{server.url}/info").json()["scheduler"]
        return s["queue_length"] + s["running_batch_size"] + s["processed"] == 4

    wait_until(all_accepted, 60, "four accepted jobs")
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "/ready to turn 503")
    refused = httpx.post(f"{server.url}/generate", json={"prompt": "too late"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
    for t in threads:
        t.join(300)
    assert [r.status_code for r in results] == [200] * 4
    assert server.proc.wait(60) == 0


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
    lines = [line for line in done.stderr.splitlines() if line.startswith("qwen-image:")]
    assert len(lines) == 2 and "Traceback" not in done.stderr
    assert any("QWEN_IMAGE_MAX_QUEUE" in line and "'abc'" in line for line in lines)
    assert any("QWEN_IMAGE_QUANTIZE" in line and "'fp16'" in line and "'int8'" in line for line in lines)


def test_model_that_cannot_load_exits_with_a_paragraph_not_a_traceback(spawn, tmp_path):
    missing = tmp_path / "no-such-model"
    server = spawn(QWEN_IMAGE_MODEL=str(missing))
    assert server.proc.wait(180) != 0
    out = server.output()
    assert f"Could not load the model '{missing}'" in out and "does not exist" in out
    assert "QWEN_IMAGE_MODEL" in out  # says what to do
    assert "Traceback" not in out


def test_generate_cli_writes_one_image_without_a_server(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "qwen_image_server", "generate", "a cat", "--aspect-ratio", "16:9",
         "--out", "cat.png", "--num-inference-steps", "2", "--add-overlay"],
        cwd=tmp_path, env=server_env(free_port()), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "cat.png").size == (1664, 928)
    assert "saved cat.png (1664x928" in done.stdout


def test_example_clients_run_against_a_server(spawn, tmp_path):
    server = spawn().wait_ready()
    for script, extra in (("test_client.py", ["--steps", "2", "--out", str(tmp_path / "t.png")]),
                          ("test_concurrent.py", ["--steps", "2", "-n", "3"])):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--url", server.url, *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "Speedup from concurrency" in done.stdout
    assert Image.open(io.BytesIO((tmp_path / "t.png").read_bytes())).size == (512, 512)


def test_generate_cli_talks_to_a_running_server_with_a_progress_bar(tiny_server, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "qwen_image_server", "generate", "a cat", "--url", tiny_server.url,
         "--out", "remote.png", "--num-inference-steps", "3", "--seed", "5"],
        cwd=tmp_path, env=server_env(free_port()), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3/3" in done.stderr  # the progress bar reached the last step
    local = httpx.post(f"{tiny_server.url}/generate", timeout=120, json={
        "prompt": "a cat", "num_inference_steps": 3, "seed": 5, "add_overlay": False})
    assert (tmp_path / "remote.png").read_bytes() == local.content
