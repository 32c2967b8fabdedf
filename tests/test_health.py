"""Liveness and readiness through the app with a fake engine (no model): loading, dead engine."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from qwen_image_server.api.app import create_app
from qwen_image_server.engine.types import DeviceFailure
from tests.conftest import tiny_settings
from tests.fakes import FakeEngine


def test_ready_waits_for_the_model_while_health_stays_up(tmp_path):
    loaded = threading.Event()
    engine = FakeEngine()

    def slow_load():
        loaded.wait(10)
        return engine

    with TestClient(create_app(tiny_settings(tmp_path), engine_factory=slow_load)) as client:
        assert client.get("/health").json()["model_loaded"] is False
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "model loading"
        loaded.set()
        client.post("/generate", json={"prompt": "x", "num_inference_steps": 1}).raise_for_status()
        assert client.get("/ready").status_code == 200


def test_dead_engine_turns_health_and_ready_503(tmp_path):
    engine = FakeEngine()
    engine.faults.append(DeviceFailure("CUDA error: unspecified launch failure"))
    app = create_app(tiny_settings(tmp_path), engine_factory=lambda: engine)
    with TestClient(app) as client:
        r = client.post("/generate", json={"prompt": "x", "num_inference_steps": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert client.get("/ready").json()["reason"] == "engine failed"
        refused = client.post("/generate", json={"prompt": "again"})
        assert refused.status_code == 503
        assert app.state.lifecycle.exit_requested and app.state.lifecycle.exit_code == 1


def test_a_hung_engine_in_this_process_fails_its_batch_and_asks_for_a_fresh_process(tmp_path):
    engine = FakeEngine(held=True)  # its steps never come until the test lets them
    app = create_app(tiny_settings(tmp_path, batch_timeout_s=0.5), engine_factory=lambda: engine)
    with TestClient(app) as client:
        try:
            r = client.post("/generate", json={"prompt": "x", "num_inference_steps": 1})
            assert r.status_code == 503, r.text
            assert (r.json()["error"]["type"], r.json()["error"]["code"]) == ("engine_unavailable", "engine_timeout")
            health = client.get("/health")
            reason = "engine failed: a batch hung past its deadline"
            assert (health.status_code, health.json()["reason"]) == (503, reason)
            assert client.get("/ready").json() == {"ready": False, "reason": reason}
            # It cannot be killed in this process: the process manager starts a fresh one.
            assert app.state.lifecycle.exit_requested and app.state.lifecycle.exit_code == 1
        finally:
            engine.run_freely()
