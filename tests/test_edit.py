"""Editing on the real tiny edit model (QwenImageEditPlusPipeline), through every API.

The edit pipelines encode every input at about one megapixel whatever its size; on the tiny
model that costs seconds per image on a CPU. Here diffusers' working sizes are shrunk (the
module constants and the inpaint pipeline's sizing) so each edit takes a fraction of that: the
server's code path is the same, and what clients ask for (output sizes) is unaffected.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from qwen_image_server.api.app import create_app, real_engine_factory
from qwen_image_server.engine.types import EditSpec, GenerationSpec
from qwen_image_server.scheduler import Scheduler, SchedulerConfig
from tests.conftest import LiveServer, run_cli, tiny_settings, wait_until
from tests.fakes import FakeEngine

STEPS = 2


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory, small_working_size):
    settings = tiny_settings(tmp_path_factory.mktemp("edit"))
    live = LiveServer(create_app(settings, engine_factory=real_engine_factory(settings))).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def oai(edit_server):
    return openai.OpenAI(base_url=f"{edit_server.url}/v1", api_key="unused", max_retries=0)


def picture(seed: int, size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def native_edit(client: httpx.Client, images: list[bytes], **fields) -> httpx.Response:
    data = {"prompt": "make it night", "num_inference_steps": str(STEPS), "add_overlay": "false", **fields}
    files = [("image", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    return client.post("/edit", data=data, files=files)


def test_edit_as_files_or_base64_gives_the_same_image(edit_server):
    image = picture(1)
    with edit_server.client() as client:
        as_files = native_edit(client, [image], seed="5")
        as_json = client.post("/edit", json={
            "prompt": "make it night", "num_inference_steps": STEPS, "add_overlay": False, "seed": 5,
            "images": [base64.b64encode(image).decode()]})
    assert as_files.status_code == 200 and as_files.headers["content-type"] == "image/png", as_files.text
    assert as_json.status_code == 200, as_json.text
    assert Image.open(io.BytesIO(as_files.content)).size == (256, 256)  # 64x64 snapped into 256-2048
    assert as_files.content == as_json.content  # same seed, same inputs: the same image


def test_openai_client_multi_image_edit_batches_n_and_each_equals_its_request_alone(edit_server, oai):
    first, second = picture(2), picture(3, (96, 64))
    batches = edit_server.scheduler()["batches"]
    response = oai.images.edit(image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                               prompt="put the cat on the sofa", n=2, size="256x256",
                               extra_body={"num_inference_steps": STEPS, "seed": 7})
    assert edit_server.scheduler()["batches"] == batches + 1  # both images in one call
    assert len(response.data) == 2 and response.size == "256x256"
    assert response.model_extra["model"] == "tiny-edit"
    assert response.usage.input_tokens_details.image_tokens > 0
    with edit_server.client() as client:
        alone = native_edit(client, [first, second], prompt="put the cat on the sofa", seed="8", size="256x256")
    assert alone.headers["X-Batch-Size"] == "1"
    batched = pixels(base64.b64decode(response.data[1].b64_json))
    worst = np.abs(batched - pixels(alone.content)).max()
    assert worst <= 1, f"batched edit differs from the same edit alone by {worst} levels"


def test_masked_edit_changes_only_the_transparent_area(edit_server, oai):
    image = picture(4, (128, 128))
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (48, 48, 80, 80))  # transparent: change this square
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    results = []
    for seed in (1, 2):
        response = oai.images.edit(image=("a.png", image, "image/png"), mask=("m.png", buf.getvalue(), "image/png"),
                                   prompt="a red ball", size="256x256",
                                   extra_body={"num_inference_steps": STEPS, "seed": seed, "strength": 1.0})
        results.append(pixels(base64.b64decode(response.data[0].b64_json)))
    assert results[0].shape == (256, 256, 3)
    # Outside the mask: the original picture (at the output size), whatever the seed.
    original = np.asarray(Image.open(io.BytesIO(image)).resize((256, 256), Image.Resampling.LANCZOS)).astype(int)
    outside = np.ones((256, 256), dtype=bool)
    outside[80:176, 80:176] = False  # the square (96..160 at 256x256) and the blur of its edge
    for result in results:
        assert np.abs(result - original)[outside].max() == 0  # all four sides, corners included
    # Inside: made anew, so another seed gives other pixels.
    assert np.abs(results[0] - results[1])[104:152, 104:152].mean() > 1


def test_streamed_edit_sends_image_edit_completed_events(edit_server, oai):
    stream = oai.images.edit(image=("a.png", picture(5), "image/png"), prompt="make it night", n=1,
                             size="256x256", stream=True, extra_body={"num_inference_steps": STEPS})
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.completed"]
    assert pixels(base64.b64decode(events[0].b64_json)).shape == (256, 256, 3)


def test_one_step_edits_are_not_black(edit_server):
    with edit_server.client() as client:
        response = native_edit(client, [picture(6)], num_inference_steps="1")
    assert response.status_code == 200, response.text
    image = pixels(response.content)
    assert np.isfinite(image).all() and image.std() > 5 and image.mean() > 5


def test_edit_jobs_report_progress_like_generations(edit_server):
    with edit_server.client() as client:
        created = client.post("/v1/jobs/edit", data={"prompt": "make it night", "num_inference_steps": str(STEPS),
                                                     "add_overlay": "false", "size": "256x256"},
                              files=[("image", ("a.png", picture(7), "image/png"))])
        assert created.status_code == 202, created.text
        job = created.json()
        assert (job["width"], job["height"]) == (256, 256)
        events = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
        assert events[-1] == "succeeded" and events.count("step") == STEPS, events
        image = client.get(f"/v1/jobs/{job['id']}/image")
        assert image.status_code == 200 and pixels(image.content).shape == (256, 256, 3)


# -- batching (the fake engine: exact, instant) ------------------------------------------------


def edit_spec(seed: int, size=(64, 64), prompt="p", images=1) -> EditSpec:
    inputs = tuple(Image.new("RGB", size) for _ in range(images))
    return EditSpec(prompt, " ", 256, 256, 2, 4.0, seed, model="tiny-edit", images=inputs,
                    inputs_digest=f"{size}{images}{prompt}", one_prompt_per_call=True)


def test_edits_batch_only_with_compatible_edits_never_with_generations():
    engine = FakeEngine(held=True)
    scheduler = Scheduler(lambda: engine, SchedulerConfig(max_batch_size=8, max_batch_pixels=10**8))
    scheduler.start()
    try:
        wait_until(lambda: scheduler.loaded, 10, "the fake engine")
        blocker = scheduler.submit(GenerationSpec("block", " ", 256, 256, 2, 4.0, 0, model="tiny"), 0)
        engine.wait_started()
        specs = [
            GenerationSpec("p", " ", 256, 256, 2, 4.0, 1, model="tiny"),  # a generation: alone
            edit_spec(2), edit_spec(3),  # same prompt, same inputs: together
            edit_spec(4, size=(96, 64)),  # other input size
            edit_spec(5, images=2),  # other number of inputs
            edit_spec(6, prompt="q"),  # other prompt (one prompt per call)
        ]
        jobs = [scheduler.submit(spec, i + 1) for i, spec in enumerate(specs)]
        engine.run_freely()
        for job in [blocker, *jobs]:
            job.future.result(timeout=10)
    finally:
        scheduler.shutdown(timeout=5)
    assert engine.batches == [[0], [1], [2, 3], [4], [5], [6]]


# -- the command line --------------------------------------------------------------------------


def test_cli_edits_locally_and_on_a_running_server(edit_server, small_working_size, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(picture(8))
    local, remote = tmp_path / "local.png", tmp_path / "remote.png"
    common = ["--num-inference-steps", str(STEPS), "--seed", "3", "--size", "256x256"]
    assert run_cli("edit", str(photo), "make it night", "--out", str(local), "--threads", "1", *common) == 0
    assert run_cli("edit", str(photo), "make it night", "--out", str(remote), "--url", edit_server.url, *common) == 0
    assert "saved" in capsys.readouterr().out
    # The same model, seed and inputs: the same picture whichever way it was made.
    assert np.abs(pixels(local.read_bytes()) - pixels(remote.read_bytes())).max() <= 1

    assert run_cli("edit", "make it night") == 2  # no image: says how to call it
    assert "give the image file(s), then the prompt" in capsys.readouterr().err
