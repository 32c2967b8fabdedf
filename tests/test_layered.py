"""Qwen-Image-Layered on the embedded tiny layered model (QwenImageLayeredPipeline, its RGBA VAE):
one image in, N RGBA layers out, through the OpenAI edits route and the official client.

The pipeline sizes its layers from a resolution bucket (640 or 1024 pixels a side); here its
sizing is shrunk to 128x128 (diffusers' module function and the server's copy of it), as the
edit tests shrink the edit pipelines' working size: the server's path is the same."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer, tiny_settings

STEPS = 2


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as pipeline_module

    from qwen_image_server.serving import specs

    real_pipeline, real_server = pipeline_module.calculate_dimensions, specs.layered_size
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_module, "calculate_dimensions", lambda area, ratio: real_pipeline(128 * 128, ratio))
        patch.setattr(specs, "layered_size", lambda size, resolution: real_server(size, 128))
        live = LiveServer(tiny_settings(tmp_path_factory.mktemp("layered"), model="tiny-layered")).start()
        yield live
        live.stop()


@pytest.fixture(scope="module")
def oai(layered):
    return openai.OpenAI(base_url=f"{layered.url}/v1", api_key="unused", max_retries=0)


def picture(seed: int, size=(96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 3] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def split(oai, seed: int, layers: int = 3, image: bytes | None = None):
    return oai.images.edit(image=("photo.png", image or picture(1), "image/png"), prompt="a cat on a sofa",
                           model="tiny-layered", extra_body={"layers": layers, "num_inference_steps": STEPS,
                                                             "seed": seed})


def test_one_image_becomes_n_rgba_layers_of_one_size_reproducible_by_seed(oai, layered):
    answer = split(oai, seed=4)
    layers = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in answer.data]
    assert len(layers) == 3
    assert {layer.mode for layer in layers} == {"RGBA"}
    assert len({layer.size for layer in layers}) == 1 and answer.size == "x".join(map(str, layers[0].size))
    alpha = np.stack([np.asarray(layer.getchannel("A")) for layer in layers])
    assert alpha.min() < 255  # layers are not all opaque
    assert answer.background == "transparent"
    again = split(oai, seed=4)
    assert [item.b64_json for item in again.data] == [item.b64_json for item in answer.data]
    other = split(oai, seed=5)
    assert [item.b64_json for item in other.data] != [item.b64_json for item in answer.data]


def test_layers_out_of_range_or_a_stream_is_a_400_naming_the_field(layered):
    with layered.client() as client:
        for fields, param in (({"layers": "11"}, "layers"), ({"layers": "1"}, "layers"),
                              ({"stream": "true"}, "stream")):
            response = client.post("/v1/images/edits", files=[("image", ("a.png", picture(2), "image/png"))],
                                   data={"prompt": "x", "model": "tiny-layered", **fields})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param, response.text


def test_the_resolution_bucket_goes_through_the_official_client_as_a_form_field(oai, layered):
    answer = oai.images.edit(image=("photo.png", picture(1), "image/png"), prompt="a cat", model="tiny-layered",
                             extra_body={"layers": 2, "resolution": 1024, "num_inference_steps": STEPS})
    assert len(answer.data) == 2
    with pytest.raises(openai.BadRequestError) as refused:
        oai.images.edit(image=("photo.png", picture(1), "image/png"), prompt="a cat", model="tiny-layered",
                        extra_body={"layers": 2, "resolution": 800})
    assert refused.value.body["param"] == "resolution"


def test_v1_models_lists_the_layered_model(layered):
    with layered.client() as client:
        [card] = client.get("/v1/models").json()["data"]
    assert card["tasks"] == ["layered"] and card["pipeline"] == "QwenImageLayeredPipeline"
