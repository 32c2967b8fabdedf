"""The generation model's other tasks on the embedded tiny model: image-to-image, inpainting and
ControlNet, through /generate, the jobs API, the OpenAI client and the CLI.

Sizes are /generate's smallest preset (512x512) or 256x256 through the OpenAI route, 2 steps."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer, tiny_settings

STEPS = 2
SIZE = (512, 512)  # /generate's "s1:1"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    live = LiveServer(tiny_settings(tmp_path_factory.mktemp("family"))).start()
    yield live
    live.stop()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def picture(seed: int, size=SIZE) -> bytes:
    """A smooth random picture (blocks of 32 pixels), so the VAE can nearly reproduce it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3))
    return png(np.kron(small, np.ones((32, 32, 1))))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def generate(client: httpx.Client, **fields) -> httpx.Response:
    body = {"prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": STEPS,
            "add_overlay": False, "seed": 3, **fields}
    return client.post("/generate", json=body)


def ok(response: httpx.Response) -> bytes:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return response.content


# -- image-to-image and inpainting ------------------------------------------------------------

def round_trip(pipeline, data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The picture through the tiny model's VAE (encode, decode): the closest any result can be."""
    import torch

    processor = pipeline.image_processor
    tensor = processor.preprocess(Image.open(io.BytesIO(data)).convert("RGB"), size[1], size[0]).unsqueeze(2)
    with torch.no_grad():
        decoded = pipeline.vae.decode(pipeline.vae.encode(tensor).latent_dist.mode()).sample[:, :, 0]
    return np.rint(processor.postprocess(decoded, output_type="np")[0] * 255).astype(int)


def test_strength_near_zero_stays_close_to_the_picture_and_one_ignores_it(family, tiny_pipeline):
    small = (256, 256)  # through the OpenAI route, which takes sizes below /generate's presets
    first, second = picture(1, small), picture(2, small)

    def made(**fields) -> np.ndarray:
        body = {"prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 5,
                "true_cfg_scale": 1.0, "seed": 3, **fields}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        return pixels(base64.b64decode(response.json()["data"][0]["b64_json"]))

    with family.client() as client:
        plain = made()
        by_strength = {strength: (made(image=b64(first), strength=strength), made(image=b64(second), strength=strength))
                       for strength in (0.05, 0.6, 1.0)}
    # How much the picture shows through: the two pictures' results differ less as strength rises,
    # and not at all at 1 (the picture is all noise from the first step).
    shows = {strength: float(np.abs(a - b).mean()) for strength, (a, b) in by_strength.items()}
    assert shows[0.05] > shows[0.6] > shows[1.0] == 0.0, shows
    # Near 0 the result is the picture as the model's VAE gives it back, much nearer to that than
    # a generation from noise is. (The tiny VAE is a random network whose decoder varies little
    # with its latents, so every distance here is a few levels of 255: relative, not absolute.)
    reference = round_trip(tiny_pipeline, first, small)
    near = float(np.abs(by_strength[0.05][0] - reference).mean())
    far = float(np.abs(plain - reference).mean())
    assert near < 0.75 * far, (near, far)


def test_inpainting_changes_only_the_masked_area(family):
    start = picture(3)
    alpha = np.full((SIZE[1], SIZE[0]), 255)
    alpha[128:384, 192:320] = 0  # transparent: the area to change
    rgba = np.dstack([pixels(start), alpha])
    mask = png(rgba, "RGBA")
    with family.client() as client:
        result = pixels(ok(generate(client, image=b64(start), mask=b64(mask))))
    original = pixels(start)
    inside = np.zeros(alpha.shape, bool)
    inside[128:384, 192:320] = True
    # Outside the mask the picture comes back exactly (the pipeline keeps its latents there, and
    # the server pastes the picture back where the decoder spreads a change past the edge).
    assert (result[~inside] == original[~inside]).all()
    assert float(np.abs(result[inside] - original[inside]).mean()) > 20  # repainted


@pytest.mark.parametrize(("fields", "param"), [
    ({"image": "not base64!"}, "image"),
    ({"image": b64(b"not an image")}, "image"),
    ({"image": "@", "strength": 0}, "strength"),
    ({"image": "@", "strength": 1.5}, "strength"),
    ({"strength": 0.5}, "strength"),
    ({"mask": "@mask"}, "mask"),
    ({"image": "@", "mask": "@opaque"}, "mask"),  # no alpha channel
    ({"image": "@", "mask": "@small"}, "mask"),  # not the picture's size
])
def test_a_bad_picture_strength_or_mask_is_a_400_naming_the_field(family, fields, param):
    start = picture(4)
    values = {"@": b64(start), "@mask": b64(png(np.zeros((512, 512, 4)), "RGBA")),
              "@opaque": b64(start), "@small": b64(png(np.zeros((64, 64, 4)), "RGBA"))}
    body = {key: values.get(value, value) if isinstance(value, str) else value for key, value in fields.items()}
    with family.client() as client:
        response = generate(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_image_to_image_job_reports_every_step_over_sse_and_matches_generate(family):
    start = picture(5)
    with family.client() as client:
        direct = ok(generate(client, image=b64(start), strength=1.0, num_inference_steps=4))
        created = client.post("/v1/jobs", json={
            "prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": 4,
            "add_overlay": False, "seed": 3, "image": b64(start), "strength": 1.0, "preview": "latent"})
        assert created.status_code == 202, created.text
        job = created.json()["id"]
        events = []
        with client.stream("GET", f"/v1/jobs/{job}/events") as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((name, json.loads(line.split(":", 1)[1])))
                    if name in ("succeeded", "failed", "cancelled"):
                        break
        image = client.get(f"/v1/jobs/{job}/image")
    names = [name for name, _ in events]
    assert names[-1] == "succeeded", events[-1]
    steps = [data["progress"]["step"] for name, data in events if name == "step"]
    assert steps[-1] == 4 and "preview" in names
    assert image.content == direct  # same request through either API, same bytes


# -- ControlNet -------------------------------------------------------------------------------

def edges(seed: int, size=SIZE) -> bytes:
    """A control image like a canny map: white lines on black."""
    rng = np.random.default_rng(seed)
    lines = np.zeros((size[1], size[0], 3))
    for row in rng.integers(0, size[1], 12):
        lines[row:row + 4, :] = 255
    for column in rng.integers(0, size[0], 12):
        lines[:, column:column + 4] = 255
    return png(lines)


def test_the_embedded_model_lists_its_tasks_and_pipelines(family):
    with family.client() as client:
        models = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    tiny = models["tiny"]
    assert tiny["tasks"] == ["generate", "image-to-image", "inpaint", "controlnet", "controlnet-inpaint"]
    assert tiny["pipelines"] == ["QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                                 "QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline"]
    assert tiny["controlnets"] == ["tiny-controlnet", "tiny-controlnet-inpaint"] and tiny["checkpoint"] == "tiny"
    assert models["tiny-edit"]["tasks"] == ["edit"]
    assert models["tiny-layered"]["tasks"] == ["layered"]
    assert models["tiny-layered"]["pipeline"] == "QwenImageLayeredPipeline"


def test_control_image_steers_and_scale_zero_is_no_controlnet_byte_for_byte(family):
    control = b64(edges(1))
    with family.client() as client:
        plain = ok(generate(client))
        steered = ok(generate(client, control_image=control))
        again = ok(generate(client, control_image=control))
        other = ok(generate(client, control_image=b64(edges(2))))
        zero = ok(generate(client, control_image=control, controlnet_conditioning_scale=0))
        late = ok(generate(client, control_image=control, control_guidance_start=0.5))
    assert steered == again  # same seed, same control: same bytes
    assert float(np.abs(pixels(steered) - pixels(plain)).mean()) > 0.5
    assert steered != other and late not in (steered, plain)
    assert zero == plain


@pytest.mark.parametrize(("fields", "param"), [
    ({"control_image": "@small"}, "control_image"),  # not the output's size
    ({"controlnet_conditioning_scale": 0.8}, "control_image"),  # the knob without the image
    ({"control_image": "@", "image": "@"}, "control_image"),
    ({"control_image": "@", "control_guidance_start": 0.6, "control_guidance_end": 0.4}, "control_guidance_end"),
    ({"control_image": "@", "controlnet_conditioning_scale": -1}, "controlnet_conditioning_scale"),
])
def test_a_bad_control_request_is_a_400_naming_the_field(family, fields, param):
    values = {"@": b64(edges(3)), "@small": b64(edges(3, (256, 256)))}
    body = {key: values.get(value, value) if isinstance(value, str) else value for key, value in fields.items()}
    with family.client() as client:
        response = generate(client, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_a_model_without_a_controlnet_refuses_a_control_image(server):
    from tests.fakes import FakeEngine

    live = server(FakeEngine, controlnets="none")
    with live.client() as client:
        response = generate(client, control_image=b64(edges(1)))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "control_image" and "QWEN_IMAGE_CONTROLNETS" in response.text


def test_openai_client_jobs_and_cli_send_a_control_image(family, tmp_path):
    control = edges(4, (256, 256))
    oai = openai.OpenAI(base_url=f"{family.url}/v1", api_key="unused", max_retries=0)
    extra = {"num_inference_steps": STEPS, "seed": 9, "control_image": b64(control),
             "controlnet_conditioning_scale": 0.7}
    batches = family.scheduler()["batches"]
    answer = oai.images.generate(prompt="a lighthouse at dusk", size="256x256", n=2, extra_body=extra)
    assert family.scheduler()["batches"] == batches + 1  # both images in one ControlNet call
    first = base64.b64decode(answer.data[0].b64_json)
    plain = oai.images.generate(prompt="a lighthouse at dusk", size="256x256",
                                extra_body={"num_inference_steps": STEPS, "seed": 9})
    assert first != base64.b64decode(plain.data[0].b64_json)
    # The same request on a 512x512 preset through the jobs API and the CLI (which uses the jobs API).
    big = edges(5)
    with family.client() as client:
        direct = ok(generate(client, control_image=b64(big), controlnet_conditioning_scale=0.7))
    path = tmp_path / "edges.png"
    path.write_bytes(big)
    out = tmp_path / "out.png"
    from tests.conftest import run_cli

    assert run_cli("generate", "a lighthouse at dusk", "--url", family.url, "--out", str(out),
                   "--aspect-ratio", "s1:1", "--num-inference-steps", str(STEPS), "--seed", "3",
                   "--control-image", str(path), "--controlnet-conditioning-scale", "0.7") == 0
    assert out.read_bytes() == direct


# -- which checkpoint, and which ControlNets -----------------------------------------------------

@pytest.mark.parametrize(("source", "name"), [
    ("Qwen/Qwen-Image-2512", "Qwen-Image-2512"),
    ("Qwen/Qwen-Image", "Qwen-Image"),
    ("./models/Qwen-Image-Edit-2509/", "Qwen-Image-Edit-2509"),
    ("tiny", "tiny"),
    ("someone/my-finetune", None),
])
def test_v1_models_names_the_checkpoint_its_source_says(source, name):
    from qwen_image_server.serving.model_registry import checkpoint_name

    assert checkpoint_name(source) == name


def test_controlnets_are_declared_per_model_and_a_wrong_name_stops_the_server(tmp_path):
    from pydantic import ValidationError

    two = {"model": "Qwen/Qwen-Image-2512,edit=Qwen/Qwen-Image-Edit-2509"}
    assert tiny_settings(tmp_path).controlnet_sources == {"tiny": ("tiny-controlnet", "tiny-controlnet-inpaint")}
    assert tiny_settings(tmp_path, controlnets="none").controlnet_sources == {}
    assert tiny_settings(tmp_path, controlnets="InstantX/Qwen-Image-ControlNet-Union", **two).controlnet_sources == {
        "Qwen/Qwen-Image-2512": ("InstantX/Qwen-Image-ControlNet-Union",)}
    with pytest.raises(ValidationError, match="does not serve"):
        tiny_settings(tmp_path, controlnets="other=InstantX/Qwen-Image-ControlNet-Union", **two)


def test_batch_keys_keep_kinds_strengths_and_controlnet_settings_apart():
    from qwen_image_server.engine.types import GenerationSpec

    red, blue = Image.new("RGB", SIZE, "red"), Image.new("RGB", SIZE, "blue")
    mask = Image.new("L", SIZE, 255)
    base = dict(prompt="x", negative_prompt=" ", width=512, height=512, num_inference_steps=2, true_cfg_scale=4.0)
    text = GenerationSpec(seed=1, **base)
    img2img = GenerationSpec(seed=2, image=red, strength=0.6, **base)
    keys = {
        "text": text.batch_key,
        "img2img": img2img.batch_key,
        "img2img other strength": GenerationSpec(seed=1, image=red, strength=0.5, **base).batch_key,
        "inpaint": GenerationSpec(seed=1, image=red, mask=mask, strength=0.6, **base).batch_key,
        "control": GenerationSpec(seed=1, control_images=(red,), **base).batch_key,
        "control other scale": GenerationSpec(seed=1, control_images=(red,), control_scales=(0.5,), **base).batch_key,
        "control other window": GenerationSpec(seed=1, control_images=(red,), control_end=0.5, **base).batch_key,
        "control, one per ControlNet": GenerationSpec(seed=1, control_images=(red, blue), **base).batch_key,
        "control, a scale each": GenerationSpec(seed=1, control_images=(red,), control_scales=(1.0, 0.5),
                                                **base).batch_key,
        "ControlNet inpainting": GenerationSpec(seed=1, control_images=(red,), mask=mask, **base).batch_key,
    }
    assert len(set(keys.values())) == len(keys)
    # Different pictures (and seeds, prompts) of one size and kind share a call.
    assert GenerationSpec(seed=9, image=blue, strength=0.6, **{**base, "prompt": "y"}).batch_key == img2img.batch_key
    assert img2img.without_pixels().image is None and text.without_pixels() == text
