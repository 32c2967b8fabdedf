"""Live previews: job `preview` events, OpenAI partial images, and the final image unchanged.

One tiny-model server for the module (edits at the small working size of tests/test_edit.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import openai
import pytest
import torch
from httpx_sse import connect_sse
from PIL import Image

from qwen_image_server.engine.previews import Previewer, decode
from qwen_image_server.engine.types import GenerationSpec, Preview, PreviewPlan
from qwen_image_server.protocol.native import JobRequest
from qwen_image_server.scheduler import Job
from qwen_image_server.serving.job_registry import JobRecord, Subscriber
from tests.conftest import LiveServer, hold_engine, tiny_settings
from tests.test_edit import picture
from tests.test_metrics import scrape, value

STEPS = 4
pytestmark = pytest.mark.xdist_group("previews")  # the module's server, and the edit sizes it sets


@pytest.fixture(scope="module")
def live(tmp_path_factory, small_working_size) -> Iterator[LiveServer]:
    server = LiveServer(tiny_settings(tmp_path_factory.mktemp("previews"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(live) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="any", max_retries=0, timeout=120) as client:
        yield client


def job_body(seed: int, **fields) -> dict:
    return {"prompt": "a paper boat", "num_inference_steps": STEPS, "true_cfg_scale": 4.0, "seed": seed,
            "add_overlay": False, **fields}


@contextmanager
def event_stream(url: str, job_id: str) -> Iterator[Iterator[tuple[str, dict]]]:
    with httpx.Client(timeout=120) as client, connect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/events") as source:
        yield ((e.event, json.loads(e.data)) for e in source.iter_sse())


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.float64)


def final_png(job: dict) -> bytes:
    response = httpx.get(job["image_url"], timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return response.content


def run_job(live: LiveServer, body: dict) -> tuple[list[tuple[str, dict]], dict]:
    """Create a job while the engine is held, subscribe from its start, return (events, final)."""
    with hold_engine(live):
        created = httpx.post(f"{live.url}/v1/jobs", json=body, timeout=60)
        assert created.status_code == 202, created.text
        with event_stream(live.url, created.json()["id"]) as stream:
            first = next(stream)
            live.hook.release()
            events = [first, *stream]
    return events, events[-1][1]


# -- jobs ---------------------------------------------------------------------------------------

def test_latent_previews_arrive_with_their_step_and_the_final_image_is_unchanged(live):
    events, final = run_job(live, job_body(11, preview="latent"))
    assert final["status"] == "succeeded", final
    previews = [data for name, data in events if name == "preview"]
    assert previews, [name for name, _ in events]
    steps = [p["step"] for p in previews]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # in order; the newest always arrives
    last_step_seen = 0
    for name, data in events:  # each preview comes after the step it shows
        if name == "step":
            last_step_seen = data["progress"]["step"]
        elif name == "preview":
            assert data["step"] <= last_step_seen and data["total"] == STEPS
    for preview in previews:
        assert preview["mode"] == "latent" and preview["id"] == final["id"]
        image = image_of(preview["b64_json"])
        assert image.format == preview["media_type"].removeprefix("image/").upper()
        # One pixel per 8x8 patch, doubled: a quarter of the 512x512 image.
        assert image.size == (preview["width"], preview["height"]) == (128, 128)
    assert final["preview_time"] is not None and final["preview_time"] >= 0

    plain = httpx.post(f"{live.url}/generate", json=job_body(11), timeout=120)
    assert plain.status_code == 200
    assert final_png(final) == plain.content  # byte-identical with and without previews


def test_full_previews_are_decodes_of_the_image_so_far_and_their_time_is_reported(live):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        before = scrape(client)
        events, final = run_job(live, job_body(12, num_inference_steps=4, preview="full", preview_every=3))
        after = scrape(client)
    previews = [data for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [3]
    last = image_of(previews[-1]["b64_json"])
    assert last.size == (512, 512) and previews[-1]["mode"] == "full"
    assert final["preview_time"] > 0 and final["inference_time"] > final["preview_time"]
    # /metrics: one full preview more, taking the job's preview time; no latent one.
    def grew(name: str, mode: str) -> float:
        return value(after, name, mode=mode) - value(before, name, mode=mode)

    assert grew("qwen_image_preview_seconds_count", "full") == 1
    assert grew("qwen_image_preview_seconds_sum", "full") == pytest.approx(final["preview_time"], abs=1e-3)
    assert grew("qwen_image_preview_seconds_count", "latent") == 0
    plain = httpx.post(f"{live.url}/generate", json=job_body(12), timeout=120)
    assert final_png(final) == plain.content


def test_a_late_subscriber_gets_the_newest_preview_at_once(live):
    hook = live.hook
    hook.hold_after_next_preview()
    try:
        created = httpx.post(f"{live.url}/v1/jobs", json=job_body(13, preview="latent"), timeout=60).json()
        assert hook.previewed.wait(120), "no preview was made"
        # The engine now waits after step 1; a client that only now subscribes...
        with event_stream(live.url, created["id"]) as stream:
            assert next(stream)[0] == "started"
            name, data = next(stream)
            # ...sees the image so far at once, before any further step.
            assert (name, data["step"]) == ("preview", 1)
            hook.release()
            rest = list(stream)
    finally:
        hook.reset()
    assert rest[-1][0] == "succeeded"


def test_a_subscriber_that_falls_behind_gets_the_newest_preview_not_a_backlog():
    async def scenario() -> None:
        job = Job(spec=GenerationSpec("a cat", " ", 256, 256, 3, 4.0, 1), request_id=1, submitted_at=0.0, deadline=1e9)
        record = JobRecord.create(job=job, body=JobRequest(prompt="a cat"), loop=asyncio.get_running_loop())
        subscriber = Subscriber()
        record.subscribers.add(subscriber)
        image = Image.new("RGB", (8, 8))
        for step in (1, 2, 3):  # three previews from the engine's thread while the client reads nothing
            record.previews.offer(0, Preview(step, 3, "latent", image, 0.0))
        await asyncio.sleep(0)  # the loop takes them in
        assert subscriber.queue.qsize() == 1  # one notice waiting, not three images
        encoded: list[int] = []

        async def encode(preview: Preview):
            encoded.append(preview.step)
            return preview.step

        assert await record.encoded_preview(encode) == 3  # the newest
        assert await record.encoded_preview(encode) == 3
        assert encoded == [3]  # encoded once, however many read it

    asyncio.run(scenario())


def test_edit_jobs_send_previews_too(live):
    with hold_engine(live):
        created = httpx.post(f"{live.url}/v1/jobs/edit", data={
            "prompt": "make it night", "num_inference_steps": "2", "size": "256x256", "add_overlay": "false",
            "preview": "latent"}, files=[("image", ("a.png", picture(7), "image/png"))], timeout=60)
        assert created.status_code == 202, created.text
        with event_stream(live.url, created.json()["id"]) as stream:
            first = next(stream)
            live.hook.release()
            events = [first, *stream]
    previews = [data for name, data in events if name == "preview"]
    assert events[-1][0] == "succeeded" and previews and previews[-1]["step"] == 2
    assert (previews[-1]["width"], previews[-1]["height"]) == (64, 64)


@pytest.mark.parametrize(("field", "value"), [("preview", "sketch"), ("preview_every", 0), ("preview", True)])
def test_bad_preview_fields_are_400_naming_the_field(live, field, value):
    response = httpx.post(f"{live.url}/v1/jobs", json=job_body(1, **{field: value}), timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


# -- the final image does not change -------------------------------------------------------------

def test_a_batch_with_one_previewing_job_gives_every_image_byte_identical(live):
    def batch_of_two(preview: dict) -> tuple[bytes, bytes]:
        with hold_engine(live):
            blocker = httpx.post(f"{live.url}/v1/jobs", json=job_body(1, num_inference_steps=1), timeout=60)
            live.wait_running(what="the blocker")
            jobs = [httpx.post(f"{live.url}/v1/jobs", json=job_body(seed, num_inference_steps=2, **extra),
                               timeout=60).json() for seed, extra in ((21, preview), (22, {}))]
            live.wait_scheduler("both jobs queued", queue_length=2)
        assert blocker.status_code == 202
        finals = []
        for job in jobs:
            with event_stream(live.url, job["id"]) as stream:
                finals.append(list(stream)[-1][1])
        assert live.hook.calls[-1] == [21, 22]  # the two ran as one batch
        return final_png(finals[0]), final_png(finals[1])

    assert batch_of_two({"preview": "full", "preview_every": 1}) == batch_of_two({})


# -- OpenAI partial images -----------------------------------------------------------------------

def test_partial_images_stream_before_each_completed_image(oai, live):
    extra = {"num_inference_steps": 6, "seed": 31}
    seen = len(live.hook.steps)
    stream = oai.images.generate(prompt="a paper boat", size="256x256", n=2, stream=True, partial_images=2,
                                 output_format="jpeg", extra_body=extra)
    events = list(stream)
    made = [p for event in live.hook.steps[seen:] for p in event.previews.values()]  # as the engine made them
    types = [event.type for event in events]
    assert types.count("image_generation.completed") == 2
    assert types.count("image_generation.partial_image") == 4  # 2 per image, at steps 2 and 4 of 6
    completed_seen = 0
    partial_indexes: list[int] = []
    for event in events:
        assert event.size == "256x256" and event.output_format == "jpeg" and event.background == "opaque"
        assert event.quality == "auto" and event.created_at > 0
        image = image_of(event.b64_json)
        assert image.size == (256, 256) and image.format == "JPEG"
        if event.type == "image_generation.partial_image":
            partial_indexes.append(event.partial_image_index)
        else:
            completed_seen += 1
            assert event.usage.output_tokens == (256 // 16) ** 2
    assert sorted(partial_indexes) == [0, 0, 1, 1]
    # One batch: every partial image comes before the first completed one.
    assert types == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    # Each partial image is one of the engine's previews (steps 2 and 4 of each image), each sent
    # once, at the image's size.
    assert sorted(p.step for p in made) == [2, 2, 4, 4]
    partials = [pixels(image_of(e.b64_json)) for e in events if e.type == "image_generation.partial_image"]

    def distance(made_index: int, part: np.ndarray) -> float:
        return float(np.abs(pixels(made[made_index].image) - part).mean())

    matches = [min(range(len(made)), key=lambda i, part=part: distance(i, part)) for part in partials]
    assert sorted(matches) == [0, 1, 2, 3], matches
    assert all(distance(i, part) < 3 for i, part in zip(matches, partials, strict=True))  # JPEG at quality 100

    # The same request without a stream: the same images, byte for byte.
    plain = oai.images.generate(prompt="a paper boat", size="256x256", n=2, output_format="jpeg", extra_body=extra)
    streamed = sorted(e.b64_json for e in events if e.type == "image_generation.completed")
    assert streamed == sorted(item.b64_json for item in plain.data)


def test_partial_images_without_stream_are_accepted_and_ignored(oai):
    response = oai.images.generate(prompt="a paper boat", size="256x256", partial_images=3,
                                   extra_body={"num_inference_steps": 2, "seed": 3})
    assert len(response.data) == 1 and image_of(response.data[0].b64_json).size == (256, 256)


def test_partial_images_of_an_edit(oai):
    stream = oai.images.edit(image=("a.png", picture(5), "image/png"), prompt="make it night", size="256x256",
                             stream=True, partial_images=1, extra_body={"num_inference_steps": 2, "seed": 4})
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    partial = events[0]
    assert partial.partial_image_index == 0 and partial.size == "256x256" and partial.output_format == "png"
    assert image_of(partial.b64_json).size == (256, 256)


def test_partial_images_of_a_masked_edit_keep_the_original_outside_the_mask(oai):
    # The inpaint pipeline sizes its latents itself (here 128x128 for a 256x256 answer): the
    # preview still finds their grid, is sent at the asked size, and keeps the original outside
    # the mask as the final image does.
    image = picture(4, (128, 128))
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (48, 48, 80, 80))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    stream = oai.images.edit(image=("a.png", image, "image/png"), mask=("m.png", buf.getvalue(), "image/png"),
                             prompt="a red ball", size="256x256", stream=True, partial_images=1,
                             extra_body={"num_inference_steps": 3, "seed": 2})
    partial, completed = list(stream)
    assert (partial.type, completed.type) == ("image_edit.partial_image", "image_edit.completed")
    original = pixels(Image.open(io.BytesIO(image)).resize((256, 256), Image.Resampling.LANCZOS))
    for event in (partial, completed):
        result = pixels(image_of(event.b64_json))
        assert result.shape == (256, 256, 3)
        assert np.abs(result[:80, :] - original[:80, :]).max() == 0


@pytest.mark.parametrize("value", [4, -1])
def test_partial_images_outside_0_to_3_are_400_naming_the_field(oai, value):
    with pytest.raises(openai.BadRequestError) as generation:
        oai.images.generate(prompt="a paper boat", size="256x256", stream=True, partial_images=value)
    assert generation.value.body["param"] == "partial_images"
    with pytest.raises(openai.BadRequestError) as edit:
        oai.images.edit(image=("a.png", picture(5), "image/png"), prompt="make it night", stream=True,
                        partial_images=value)
    assert edit.value.body["param"] == "partial_images"


# -- the engine side -----------------------------------------------------------------------------

def test_the_clean_estimate_at_the_last_step_is_the_final_image(live):
    """x0 = x_t - sigma_t * v with the scheduler's own sigma and the velocity after CFG: at the
    last step (sigma_next = 0) it is exactly the latents the pipeline decodes."""
    body = {**job_body(5, preview="full"), "preview_every": 1, "num_inference_steps": 3, "negative_prompt": "blurry"}
    seen = len(live.hook.steps)
    _, final = run_job(live, body)
    # The previews as the engine made them (the seam sees them before any encoding).
    previews = {p.step: p for event in live.hook.steps[seen:] for p in event.previews.values()}
    assert sorted(previews) == [1, 2, 3]
    image = pixels(Image.open(io.BytesIO(final_png(final))))
    assert previews[3].image.size == (final["width"], final["height"])
    assert np.abs(pixels(previews[3].image) - image).max() <= 1
    # Earlier estimates are of the same picture, less finished.
    assert np.abs(pixels(previews[2].image) - image).mean() > 0
    assert final["preview_time"] >= round(sum(p.seconds for p in previews.values()), 3) - 0.001


def test_partial_image_steps_are_spread_before_the_end():
    assert [s for s in range(1, 21) if PreviewPlan("full", count=3).due(s, 20)] == [5, 10, 15]
    assert [s for s in range(1, 3) if PreviewPlan("full", count=3).due(s, 2)] == [1]  # too few steps
    assert [s for s in range(1, 7) if PreviewPlan("latent", every=2).due(s, 6)] == [2, 4, 6]


def test_the_latent_projection_follows_the_vae_decode(tiny_pipeline):
    """On latents it was not fitted to, the projection's colours go with the VAE's decode."""
    previewer = Previewer.for_pipeline(tiny_pipeline, torch.device("cpu"))  # as the engine makes its own
    generator = torch.Generator().manual_seed(99)
    coarse = torch.randn(3, 16, 6, 6, generator=generator)
    latents = torch.nn.functional.interpolate(coarse, size=(24, 24), mode="bilinear") + \
        0.25 * torch.randn(3, 16, 24, 24, generator=generator)
    with torch.inference_mode():
        truth = torch.nn.functional.avg_pool2d(decode(previewer.vae, latents).float(), 8)

    def correlation(projected: torch.Tensor) -> float:
        a = (projected - projected.mean((0, 2, 3), keepdim=True)).flatten()
        b = (truth - truth.mean((0, 2, 3), keepdim=True)).flatten()
        return float(a @ b / (a.norm() * b.norm()))

    fitted = correlation(previewer.projection.apply(latents))
    # The same weights on the channels in another order: what "no relation" scores.
    shuffled = correlation(previewer.projection.apply(latents.flip(1)))
    assert fitted > 0.15 and fitted > 2 * abs(shuffled), (fitted, shuffled)
