"""The seed's API over real HTTP on the tiny model: every endpoint, parameter, aspect ratio,
both output modes, the overlay, determinism and bad input."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from qwen_image_server.config.presets import ASPECT_RATIOS, PROMPT_SUFFIX
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.protocol.native import GenerateRequest
from qwen_image_server.serving.model_registry import ANY_MODEL
from qwen_image_server.serving.specs import build_specs
from tests.conftest import hold_engine, open_request

FAST = {"num_inference_steps": 2, "add_overlay": False}


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_health_reports_device_and_loaded_model(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body == {"status": "healthy", "model_loaded": True, "device": "cpu", "gpu": None,
                    "cuda_version": None, "reason": None}


def test_ready_is_200_once_loaded(client):
    assert client.get("/ready").json() == {"ready": True, "reason": None}


def test_info_reports_true_model_facts(client, tiny_pipeline):
    info = client.get("/info").json()
    pipeline = tiny_pipeline
    params = sum(p.numel() for m in (pipeline.transformer, pipeline.vae, pipeline.text_encoder)
                 for p in m.parameters())
    assert info["total_parameters"] == params
    assert info["model_size_mb"] == pytest.approx(params * 4 / 2**20, rel=1e-3)  # fp32
    assert info["model_name"] == "tiny" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["model_load_time"] > 0
    assert info["supported_aspect_ratios"] == list(ASPECT_RATIOS)
    assert {"s1:1", "m1:1", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"} == set(info["aspect_ratios"])
    assert info["aspect_ratios"]["4:3"] == [1472, 1104]
    assert info["concurrent_support"] == "enabled"
    for key in ("queue_length", "running_batch_size", "processed", "failed", "cancelled",
                "rejected", "mean_inference_time", "max_queue", "max_batch_size"):
        assert key in info["scheduler"]


def test_generate_returns_png_bytes_with_headers(client):
    r = client.post("/generate", json={"prompt": "A cute cat", **FAST})
    image = png(r)
    assert image.size == (512, 512)
    assert int(r.headers["X-Request-ID"]) >= 1
    assert float(r.headers["X-Inference-Time"]) > 0
    assert float(r.headers["X-Queue-Time"]) >= 0  # how long it waited: see test_concurrency.py
    assert r.headers["X-Batch-Size"] == "1"


def test_generate_defaults_follow_the_seed(client, tiny_server, tiny_hook):
    # Only the prompt: what the engine is asked for is the seed API's defaults...
    with hold_engine(tiny_server):
        request = open_request(tiny_server.url, "/generate", {"prompt": "A cute cat"})
        tiny_server.wait_running(what="the request to start")
        asked = tiny_hook.specs[-1]
        request.close()  # 20 steps are not needed to know it asked for 20: cancel it
    assert asked == GenerationSpec(prompt="A cute cat" + PROMPT_SUFFIX["en"], negative_prompt=" ",
                                   width=512, height=512, num_inference_steps=20, true_cfg_scale=4.0,
                                   seed=42, model="tiny")  # the first model that can generate
    tiny_server.wait_scheduler("the cancelled request to stop", running_batch_size=0)
    # ...and the overlay is on: the same image with an info strip at the bottom.
    fewer_steps = {"prompt": "A cute cat", "num_inference_steps": 2}
    marked = png(client.post("/generate", json=fewer_steps)).convert("RGB")
    plain = png(client.post("/generate", json={**fewer_steps, "add_overlay": False})).convert("RGB")
    assert marked.size == (512, 512)
    assert marked.crop((0, 0, 512, 256)).tobytes() == plain.crop((0, 0, 512, 256)).tobytes()
    assert marked.crop((0, 500, 512, 512)).tobytes() != plain.crop((0, 500, 512, 512)).tobytes()


def test_save_to_file_answers_json_and_writes_the_png(client, tiny_server):
    r = client.post("/generate", json={"prompt": "A cute cat", "aspect_ratio": "s1:1",
                                       "save_to_file": True, **FAST})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    # The seed's fields, plus the signed link that downloads the file.
    assert set(body) == {"status", "request_id", "inference_time", "file_path", "file_url", "width", "height"}
    assert body["status"] == "success" and (body["width"], body["height"]) == (512, 512)
    assert re.fullmatch(rf"Qwen-Image-\d{{8}}_\d{{6}}-req{body['request_id']}\.png", Path(body["file_path"]).name)
    saved = Path(body["file_path"])
    assert saved.parent == tiny_server.settings.output_dir
    assert Image.open(saved).size == (512, 512)
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left


README_SIZES = {"s1:1": (512, 512), "m1:1": (512, 512), "1:1": (1328, 1328), "16:9": (1664, 928),
                "9:16": (928, 1664), "4:3": (1472, 1104), "3:4": (1104, 1472), "3:2": (1584, 1056),
                "2:3": (1056, 1584)}


@pytest.mark.parametrize("ratio", list(README_SIZES))
def test_every_aspect_ratio_answers_the_size_in_the_readme(fake_server, ratio):
    # On the fake engine: the size asked of the engine and answered is what is at stake. The tiny
    # model makes 16:9 end to end in test_process.py (the start script and the generate CLI).
    with fake_server.client() as c:
        r = c.post("/generate", json={"prompt": "a lighthouse", "aspect_ratio": ratio, "save_to_file": True,
                                      **FAST})
    body = r.json()
    assert (body["width"], body["height"]) == README_SIZES[ratio]
    assert Image.open(body["file_path"]).size == README_SIZES[ratio]
    assert ASPECT_RATIOS[ratio] == README_SIZES[ratio]


def test_same_request_gives_byte_identical_png_and_seed_changes_it(client):
    body = {"prompt": "a red bicycle", "seed": 1234, **FAST}
    first = client.post("/generate", json=body).content
    again = client.post("/generate", json=body).content
    other = client.post("/generate", json={**body, "seed": 1235}).content
    assert first == again
    assert first != other


def test_every_parameter_changes_the_image(client):
    base = {"prompt": "a red bicycle", "seed": 7, **FAST}
    reference = client.post("/generate", json=base).content
    for change in ({"negative_prompt": "blurry"}, {"true_cfg_scale": 1.0}, {"language": "zh"},
                   {"num_inference_steps": 3}, {"prompt": "a blue bicycle"}):
        assert client.post("/generate", json={**base, **change}).content != reference, change


def test_a_single_step_gives_a_real_image_not_black(client):
    body = {"prompt": "a red bicycle", "num_inference_steps": 1, "add_overlay": False}
    image = Image.open(io.BytesIO(client.post("/generate", json=body).content)).convert("L")
    low, high = image.getextrema()
    assert high - low > 5  # NaN latents decode to one flat colour (black)


def test_language_appends_the_model_card_suffix():
    def spec(body: GenerateRequest) -> GenerationSpec:
        return build_specs(body, model=ANY_MODEL, loras=(), seeds=[body.seed])[0]

    en = spec(GenerateRequest(prompt="a cat"))
    zh = spec(GenerateRequest(prompt="一只猫", language="zh"))
    assert en.prompt == "a cat" + PROMPT_SUFFIX["en"] == "a cat, Ultra HD, 4K, cinematic composition."
    assert zh.prompt == "一只猫, 超清，4K，电影级构图."


def test_overlay_draws_an_info_strip_at_the_bottom(client):
    body = {"prompt": "a quiet lake", "seed": 3, "num_inference_steps": 2}
    plain = png(client.post("/generate", json={**body, "add_overlay": False})).convert("RGB")
    marked = png(client.post("/generate", json={**body, "add_overlay": True})).convert("RGB")
    w, h = plain.size
    top = (0, 0, w, h // 2)
    assert plain.crop(top).tobytes() == marked.crop(top).tobytes()
    strip = marked.crop((0, h - 12, w, h)).convert("L").tobytes()
    before = plain.crop((0, h - 12, w, h)).convert("L").tobytes()
    assert max(strip) == 255  # white text...
    assert sum(strip) < sum(before)  # ...on a dark strip


BAD = [
    ({}, "prompt", "missing"),
    ({"prompt": ""}, "prompt", None),
    ({"prompt": "   "}, "prompt", None),
    ({"prompt": 5}, "prompt", None),
    ({"prompt": "x", "aspect_ratio": "5:4"}, "aspect_ratio", None),
    ({"prompt": "x", "language": "fr"}, "language", None),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", None),
    ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps", None),
    ({"prompt": "x", "num_inference_steps": "20"}, "num_inference_steps", None),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps", None),
    ({"prompt": "x", "seed": -1}, "seed", None),
    ({"prompt": "x", "seed": 2**32}, "seed", None),
    ({"prompt": "x", "true_cfg_scale": "high"}, "true_cfg_scale", None),
    ({"prompt": "x", "save_to_file": "yes"}, "save_to_file", None),
    ({"prompt": "x", "add_overlay": 1}, "add_overlay", None),
    (["a", "list"], "body", None),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD)
def test_bad_input_is_a_400_naming_the_field(client, body, param, code):
    r = client.post("/generate", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]
    if code:
        assert error["code"] == code
    assert client.get("/health").json()["status"] == "healthy"


def test_non_json_body_is_a_400(client):
    r = client.post("/generate", content=b"prompt=cat", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "body" and r.json()["error"]["code"] == "json_invalid"


def test_json_sent_without_the_json_content_type_says_which_header_to_send(client):
    # What `curl -d '{"prompt": "cat"}'` sends: valid JSON, labelled as a form.
    r = client.post("/generate", content=b'{"prompt": "cat"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert "application/x-www-form-urlencoded" in r.json()["error"]["message"]


def test_unknown_route_and_method_use_the_common_error_shape(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = client.get("/generate")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
