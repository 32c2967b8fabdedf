"""ControlNet inpainting, several control images at once, and control images as multipart file
parts, on the embedded tiny model and its two embedded ControlNets (one follows control images,
one inpaints), over real HTTP at /generate's smallest preset, 2 steps."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import LiveServer, tiny_settings
from tests.test_family import SIZE, b64, edges, generate, ok, picture, pixels, png


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    live = LiveServer(tiny_settings(tmp_path_factory.mktemp("controlnets"))).start()
    yield live
    live.stop()


def hole() -> tuple[bytes, np.ndarray]:
    """A mask PNG (OpenAI's convention: transparent = change) with a hole in the middle, and
    where the hole is."""
    alpha = np.full((SIZE[1], SIZE[0]), 255)
    alpha[128:384, 192:320] = 0
    return png(np.dstack([np.zeros((SIZE[1], SIZE[0], 3)), alpha]), "RGBA"), alpha == 0


# -- ControlNet inpainting --------------------------------------------------------------------

def test_controlnet_inpainting_repaints_the_masked_area_steered_by_the_picture(nets):
    start, other = picture(11), picture(12)
    mask, inside = hole()
    with nets.client() as client:
        result = ok(generate(client, control_image=b64(start), mask=b64(mask)))
        again = ok(generate(client, control_image=b64(start), mask=b64(mask)))
        moved = ok(generate(client, control_image=b64(other), mask=b64(mask)))
        zero = ok(generate(client, control_image=b64(start), mask=b64(mask), controlnet_conditioning_scale=0))
        plain = ok(generate(client))
        inpainted = ok(generate(client, image=b64(start), mask=b64(mask)))
    original = pixels(start)
    # The same seed gives the same bytes (the server encodes the masked picture at the VAE's
    # mean; diffusers' own pipeline draws that sample from torch's global generator).
    assert result == again
    # Outside the mask the picture comes back exactly; inside it is repainted.
    assert (pixels(result)[~inside] == original[~inside]).all()
    assert float(np.abs(pixels(result)[inside] - original[inside]).mean()) > 20
    # The ControlNet reads the picture around the hole: another picture, another repainting.
    assert float(np.abs(pixels(result)[inside] - pixels(moved)[inside]).mean()) > 0
    # At scale 0 the ControlNet adds zeros and the pipeline starts from the seed's noise, as
    # text-to-image does: the text-to-image image inside the mask, the picture outside, pixel
    # for pixel. The plain inpainting pipeline is another method (it starts from the picture's
    # latents, noised): its image differs.
    assert (pixels(zero)[inside] == pixels(plain)[inside]).all()
    assert (pixels(zero)[~inside] == original[~inside]).all()
    assert float(np.abs(pixels(result)[inside] - pixels(zero)[inside]).mean()) > 1
    assert inpainted != zero


def test_openai_client_inpaints_with_the_controlnet_both_images_of_n_in_one_call(nets):
    size = (256, 256)
    start = picture(13, size)
    alpha = np.full(size, 255)
    alpha[64:192, 96:160] = 0
    inside = alpha == 0
    oai = openai.OpenAI(base_url=f"{nets.url}/v1", api_key="unused", max_retries=0)
    batches = nets.scheduler()["batches"]
    answer = oai.images.generate(prompt="a red door", size="256x256", n=2, extra_body={
        "num_inference_steps": 2, "seed": 5, "control_image": b64(start),
        "mask": b64(png(np.dstack([pixels(start), alpha]), "RGBA"))})
    assert nets.scheduler()["batches"] == batches + 1  # both seeds in one pipeline call
    made = [pixels(base64.b64decode(item.b64_json)) for item in answer.data]
    for image in made:
        assert (image[~inside] == pixels(start)[~inside]).all()
    assert (made[0][inside] != made[1][inside]).any()  # two seeds, two repaintings


@pytest.mark.parametrize(("fields", "param"), [
    ({"control_image": "@small", "mask": "@mask"}, "control_image"),  # not the output's size
    ({"control_image": "@", "mask": "@small_mask"}, "mask"),  # not the control image's size
    ({"control_image": "@", "mask": "@", }, "mask"),  # no alpha channel
    ({"control_image": "@", "mask": "@mask", "image": "@"}, "control_image"),
    ({"control_image": ["@", "@"], "mask": "@mask"}, "control_image"),  # it repaints one picture
    ({"control_image": "@", "mask": "@mask", "controlnet_conditioning_scale": [1, 1]},
     "controlnet_conditioning_scale"),
    ({"control_image": "@", "mask": "@mask", "strength": 0.5}, "strength"),  # it starts from noise
    ({"control_image": ["@"] * 5}, "control_image"),  # at most 4
    ({"control_image": []}, "control_image"),
    ({"control_image": 7}, "control_image"),
    ({"control_image": "@", "controlnet_conditioning_scale": [1, 1]}, "controlnet_conditioning_scale"),
    ({"control_image": ["@", "@"], "controlnet_conditioning_scale": [1, 1, 1]}, "controlnet_conditioning_scale"),
    ({"control_image": ["@", "@"], "controlnet_conditioning_scale": [1, -1]}, "controlnet_conditioning_scale"),
    ({"control_image": "@", "controlnet_conditioning_scale": "1"}, "controlnet_conditioning_scale"),
    ({"control_image": ["@", "@small"]}, "control_image[1]"),
])
def test_a_bad_control_or_mask_is_a_400_naming_the_field(nets, fields, param):
    values = {"@": b64(edges(3)), "@small": b64(edges(3, (256, 256))), "@mask": b64(hole()[0]),
              "@small_mask": b64(png(np.zeros((256, 256, 4)), "RGBA"))}

    def filled(value):
        if isinstance(value, list):
            return [filled(item) for item in value]
        return values.get(value, value) if isinstance(value, str) else value

    with nets.client() as client:
        response = generate(client, **{key: filled(value) for key, value in fields.items()})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_a_model_without_an_inpainting_controlnet_refuses_a_mask_with_a_control_image(server):
    from tests.fakes import FakeEngine

    live = server(FakeEngine, controlnets="none")
    with live.client() as client:
        response = generate(client, control_image=b64(edges(1)), mask=b64(hole()[0]))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "mask" and "inpainting ControlNet" in response.text


# -- several control images ------------------------------------------------------------------
# (without CFG from here on: half the work, and nothing below is about guidance)

def test_several_control_images_steer_together_each_at_its_scale(nets):
    def steer(client: httpx.Client, **fields) -> httpx.Response:
        if "scale" in fields:
            fields["controlnet_conditioning_scale"] = fields.pop("scale")
        return generate(client, true_cfg_scale=1.0, **fields)

    first, second, third = b64(edges(21)), b64(edges(22)), b64(edges(23))
    with nets.client() as client:
        one = ok(steer(client, control_image=first))
        two = ok(steer(client, control_image=[first, second]))
        again = ok(steer(client, control_image=[first, second]))
        scaled = ok(steer(client, control_image=[first, second], scale=[1.0, 0.5]))
        off = ok(steer(client, control_image=[first, second], scale=[1.0, 0.0]))
        off_other = ok(steer(client, control_image=[first, third], scale=[1.0, 0.0]))
    assert two == again and two != one and scaled not in (one, two)
    # A control image at scale 0 adds exact zeros: which image it is makes no difference.
    assert off == off_other and off != two


def test_two_controlnets_of_one_kind_stop_the_server_with_the_reason(tmp_path):
    from qwen_image_server.config.settings import Settings
    from qwen_image_server.engine.loader import load_model, with_controlnets
    from qwen_image_server.errors import ModelLoadError

    settings: Settings = tiny_settings(tmp_path, controlnets="tiny-controlnet,tiny-controlnet")
    with pytest.raises(ModelLoadError, match="2 ControlNets that follow control images.*runs one per call"):
        with_controlnets(settings, load_model(settings))


# -- multipart --------------------------------------------------------------------------------

FORM_FIELDS = {"prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": "2",
               "add_overlay": "false", "seed": "3", "true_cfg_scale": "1"}


def test_multipart_control_images_and_mask_equal_the_base64_json_ones_byte_for_byte(nets):
    first, second, start = edges(31), edges(32), picture(33)
    mask = hole()[0]
    with nets.client() as client:
        json_two = ok(generate(client, true_cfg_scale=1.0, control_image=[b64(first), b64(second)],
                               controlnet_conditioning_scale=[1, 0.5]))
        form_two = ok(client.post("/generate", data={**FORM_FIELDS, "controlnet_conditioning_scale": ["1", "0.5"]},
                                  files=[("control_image", ("a.png", first, "image/png")),
                                         ("control_image", ("b.png", second, "image/png"))]))
        json_inpaint = ok(generate(client, true_cfg_scale=1.0, control_image=b64(start), mask=b64(mask),
                                   controlnet_conditioning_scale=0.8))
        form_inpaint = ok(client.post("/generate", data={**FORM_FIELDS, "controlnet_conditioning_scale": "0.8"},
                                      files={"control_image": ("start.png", start, "image/png"),
                                             "mask": ("mask.png", mask, "image/png")}))
        bad = client.post("/generate", data={**FORM_FIELDS, "controlnet_conditioning_scale": "strong"},
                          files={"control_image": ("a.png", first, "image/png")})
    assert form_two == json_two
    assert form_inpaint == json_inpaint
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "controlnet_conditioning_scale", bad.text


def test_a_multipart_job_with_a_control_image_makes_the_json_requests_image(nets):
    control = edges(41)
    with nets.client() as client:
        direct = ok(generate(client, true_cfg_scale=1.0, control_image=b64(control), control_guidance_end=0.5))
        created = client.post("/v1/jobs", data={**FORM_FIELDS, "control_guidance_end": "0.5", "loras": "[]"},
                              files={"control_image": ("edges.png", control, "image/png")})
        assert created.status_code == 202, created.text
        image = finished_image(client, created.json()["id"])
    assert image == direct


def test_json_routes_still_answer_a_wrong_body_as_before(nets):
    with nets.client() as client:
        empty = client.post("/generate", content=b"", headers={"content-type": "application/json"})
        urlencoded = client.post("/generate", content=b"prompt=x",
                                 headers={"content-type": "application/x-www-form-urlencoded"})
        broken = client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "body"
    assert urlencoded.status_code == 400 and "application/json" in urlencoded.json()["error"]["message"]
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "json_invalid"


def finished_image(client: httpx.Client, job: str) -> bytes:
    """The image of a job, once its event stream says it succeeded."""
    with client.stream("GET", f"/v1/jobs/{job}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name in ("succeeded", "failed", "cancelled"):
                assert name == "succeeded", json.loads(line.split(":", 1)[1])
                break
    return client.get(f"/v1/jobs/{job}/image").content
