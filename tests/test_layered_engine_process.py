"""A layered job with a LoRA through an engine process: the picture, its LoRA choice and the
layers cross the pipe, and the LoRA changes the layers while the same request gives the same
ZIP (one front with one engine process for the module; the layers' size is shrunk to a 128
bucket in both, as in test_layered.py)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image

from qwen_image_server.api.app import create_app
from qwen_image_server.engine.process import engine_factories
from tests.conftest import LiveServer, tiny_settings
from tests.engine_loaders import SmallLayersLoader

pytestmark = pytest.mark.xdist_group("engine-process-layered")


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[LiveServer]:
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_server.engine.tiny import build_lora, ensure_tiny_layered_model
    from qwen_image_server.serving import specs

    tmp = tmp_path_factory.mktemp("engine-process-layered")
    loras = tmp / "loras"
    settings = tiny_settings(tmp, lora_dir=loras)
    transformer = QwenImageTransformer2DModel.from_pretrained(ensure_tiny_layered_model(settings.cache_dir)
                                                              / "transformer")
    build_lora(loras / "layers-style.safetensors", transformer, base="Qwen-Image-Layered", seed=5, strength=4.0)
    real = specs.layered_size
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(specs, "layered_size", lambda size, resolution: real(size, 128))
        live = LiveServer(create_app(settings, engines=engine_factories(settings, [None], SmallLayersLoader(128))))
        live.start()
        yield live
        live.stop()


def picture() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (48, 64, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def layers_of(front: LiveServer, **fields: str) -> list[bytes]:
    form = {"layers": "2", "num_inference_steps": "2", "seed": "9", "prompt": "a poster", **fields}
    with httpx.Client(base_url=front.url, timeout=300) as http:
        created = http.post("/v1/jobs/layers", files=[("image", ("p.png", picture(), "image/png"))], data=form)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as stream:
            seen = [(event.event, json.loads(event.data)) for event in stream.iter_sse()]
        assert seen[-1][0] == "succeeded", seen
        assert [data["progress"]["step"] for name, data in seen if name == "step"] == [1, 2]
        archive = http.get(f"/v1/jobs/{job_id}/layers.zip")
    assert archive.status_code == 200, archive.text
    with zipfile.ZipFile(io.BytesIO(archive.content)) as members:
        return [members.read(name) for name in members.namelist()]


def test_a_layered_job_with_a_lora_runs_in_the_engine_process(front):
    plain = layers_of(front)
    styled = layers_of(front, loras=json.dumps([{"name": "layers-style", "scale": 1.0}]))
    assert len(plain) == len(styled) == 2
    assert {Image.open(io.BytesIO(data)).mode for data in [*plain, *styled]} == {"RGBA"}
    assert styled != plain
    assert layers_of(front, loras=json.dumps([{"name": "layers-style", "scale": 1.0}])) == styled
