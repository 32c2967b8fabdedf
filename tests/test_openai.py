"""The OpenAI-compatible API through the official `openai` client, unchanged, over real HTTP."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer
from tests.fakes import FakeEngine

FAST = {"num_inference_steps": 2}
SMALL = "256x256"


@pytest.fixture(scope="module")
def oai(tiny_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="any", max_retries=0, timeout=120) as client:
        yield client


def decode(b64: str) -> tuple[bytes, Image.Image]:
    data = base64.b64decode(b64)
    return data, Image.open(io.BytesIO(data))


def same_image(a: bytes, b: bytes) -> bool:
    """Equal up to one level per channel: fp32 matmuls of another batch shape may round differently."""
    pa, pb = (Image.open(io.BytesIO(x)).convert("RGB") for x in (a, b))
    return pa.size == pb.size and max(abs(x - y) for x, y in zip(pa.tobytes(), pb.tobytes(), strict=True)) <= 1


def generate_b64(client: openai.OpenAI, seed: int) -> bytes:
    response = client.images.generate(prompt="a lighthouse", size=SMALL, extra_body={**FAST, "seed": seed})
    return base64.b64decode(response.data[0].b64_json)


REFERENCE_SEED = 1234


@pytest.fixture(scope="module")
def reference(oai) -> bytes:
    """The PNG of one plain request with REFERENCE_SEED, made once: other tests compare with it."""
    return generate_b64(oai, REFERENCE_SEED)


def test_b64_json_is_a_png_of_the_requested_size(oai, tiny_server):
    before = int(time.time())
    response = oai.images.generate(model="gpt-image-1", prompt="a lighthouse", size="256x512",
                                   extra_body=FAST)
    assert len(response.data) == 1
    _, image = decode(response.data[0].b64_json)
    assert image.format == "PNG" and image.size == (256, 512)
    assert response.size == "256x512" and response.output_format == "png"
    assert before <= response.created <= time.time() + 1
    assert response.data[0].revised_prompt == "a lighthouse, Ultra HD, 4K, cinematic composition."
    assert response.model_extra["model"] == tiny_server.settings.model  # whatever model was asked for
    assert response.usage.output_tokens == (256 // 16) * (512 // 16)
    assert response.usage.input_tokens == response.usage.input_tokens_details.text_tokens > 0


def test_same_seed_gives_the_same_bytes(oai, reference):
    assert generate_b64(oai, REFERENCE_SEED) == reference


def test_url_serves_the_same_image_until_unknown(oai, tiny_server, reference):
    response = oai.images.generate(prompt="a lighthouse", size=SMALL, response_format="url",
                                   extra_body={**FAST, "seed": REFERENCE_SEED})
    url = response.data[0].url
    assert url.startswith(f"{tiny_server.url}/v1/images/") and response.data[0].b64_json is None
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == reference

    missing = httpx.get(f"{tiny_server.url}/v1/images/no-such-image")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_n_images_use_consecutive_seeds(oai, reference):
    response = oai.images.generate(prompt="a lighthouse", size=SMALL, n=2,
                                   extra_body={**FAST, "seed": REFERENCE_SEED - 1})
    first, second = (base64.b64decode(d.b64_json) for d in response.data)
    assert first != second
    assert same_image(second, reference)  # seed + 1, made in a batch of 2 versus alone


def test_without_a_seed_each_request_is_a_new_image(oai):
    def unseeded() -> bytes:
        response = oai.images.generate(prompt="a lighthouse", size=SMALL, extra_body=FAST)
        return base64.b64decode(response.data[0].b64_json)

    assert unseeded() != unseeded()


def test_jpeg_output_at_the_asked_compression(oai):
    def jpeg(quality: int) -> tuple[bytes, Image.Image]:
        response = oai.images.generate(prompt="a lighthouse", size=SMALL, output_format="jpeg",
                                       output_compression=quality, extra_body={**FAST, "seed": 3})
        assert response.output_format == "jpeg"
        return decode(response.data[0].b64_json)

    (fine, image), (coarse, _) = jpeg(95), jpeg(20)
    assert image.format == "JPEG" and image.size == (256, 256)
    assert len(coarse) < len(fine) * 0.8  # the same image, encoded at a lower quality


def test_webp_output_by_url(oai):
    response = oai.images.generate(prompt="a lighthouse", size=SMALL, output_format="webp",
                                   response_format="url", extra_body=FAST)
    fetched = httpx.get(response.data[0].url)
    assert fetched.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(fetched.content))
    assert image.format == "WEBP" and image.size == (256, 256)


def test_aspect_ratio_overrides_size_and_openai_only_fields_are_ignored(oai):
    response = oai.images.generate(
        prompt="a lighthouse", size="1024x1024", quality="high", style="vivid", user="someone",
        background="auto", moderation="low", partial_images=2,
        extra_body={**FAST, "aspect_ratio": "s1:1", "language": "zh", "true_cfg_scale": 1.0,
                    "negative_prompt": "fog", "not_a_parameter": [1, 2]},
    )
    _, image = decode(response.data[0].b64_json)
    assert image.size == (512, 512) and response.size == "512x512"
    assert response.data[0].revised_prompt.endswith("超清，4K，电影级构图.")


def test_streaming_sends_one_completed_event_per_image(oai, reference):
    stream = oai.images.generate(prompt="a lighthouse", size=SMALL, n=2, stream=True,
                                 extra_body={**FAST, "seed": REFERENCE_SEED - 1})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    images = [decode(e.b64_json)[0] for e in events]
    assert images[0] != images[1]
    assert any(same_image(image, reference) for image in images)  # the images a plain request gets
    for event in events:
        assert event.size == SMALL and event.output_format == "png"
        assert event.quality == "auto" and event.background == "opaque" and event.created_at > 0
        assert event.usage.output_tokens == (256 // 16) ** 2


def test_models_lists_the_served_models(oai, tiny_server):
    served = [ref.name for ref in tiny_server.settings.models]  # tiny: generation and edit
    assert [m.id for m in oai.models.list()] == served
    assert oai.models.retrieve(served[0]).owned_by == "qwen-image-server"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("dall-e-3")


def test_auto_size_is_the_large_square_and_the_side_limits_are_accepted(server):
    # On a fake engine: what is at stake is the size asked of the engine and answered; the tiny
    # model makes a large image end to end in test_process.py.
    live = server(engine=FakeEngine)
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="any", max_retries=0) as client:
        for response in (client.images.generate(prompt="a lighthouse", size="auto", extra_body=FAST),
                         client.images.generate(prompt="a lighthouse", extra_body=FAST)):  # the default
            assert response.size == "1328x1328"
            assert decode(response.data[0].b64_json)[1].size == (1328, 1328)
        for size in ("2048x256", "256x2048"):  # the largest and the smallest side, both allowed
            response = client.images.generate(prompt="a lighthouse", size=size, extra_body=FAST)
            width, height = map(int, size.split("x"))
            assert response.size == size and decode(response.data[0].b64_json)[1].size == (width, height)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"size": "100x100"}, "size"),
    ({"size": "2064x512"}, "size"),  # a multiple of 16, but over 2048
    ({"size": "512x4096"}, "size"),
    ({"size": "1000x1000"}, "size"),  # not multiples of 16
    ({"size": "large"}, "size"),
    ({"n": 11}, "n"),
    ({"n": 0}, "n"),
    ({"output_format": "gif"}, "output_format"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a lighthouse " * 1000}, "prompt"),  # more tokens than the model reads
    ({"extra_body": {"num_inference_steps": 101}}, "num_inference_steps"),
    ({"extra_body": {"aspect_ratio": "5:4"}}, "aspect_ratio"),
    ({"extra_body": {"seed": -1}}, "seed"),
])
def test_bad_requests_are_400_naming_the_parameter(oai, kwargs, param):
    kwargs = {"prompt": "a lighthouse", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.images.generate(**kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"


# -- failures, on a fake engine whose steps the test releases ------------------------------

@pytest.fixture
def fake(server) -> Iterator[tuple[openai.OpenAI, LiveServer, FakeEngine]]:
    engine = FakeEngine(held=True)
    # One job per batch, so the n jobs of a request run one after another.
    live = server(engine=lambda: engine, max_batch_size=1)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="any", max_retries=0, timeout=60)
    yield client, live, engine
    engine.run_freely()
    client.close()


def in_thread(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_one_failed_image_fails_the_request_and_cancels_the_others(fake):
    client, live, engine = fake
    engine.faults.append(RuntimeError("boom"))
    thread, outcome = in_thread(lambda: client.images.generate(
        prompt="a lighthouse", size=SMALL, n=3, extra_body={**FAST, "seed": 10}))
    engine.wait_started()
    engine.allow_steps(2)  # the first image's batch runs to its end, then raises
    thread.join(30)
    error = outcome["error"]
    assert isinstance(error, openai.InternalServerError)
    assert error.body["type"] == "inference_error"
    engine.run_freely()
    live.wait_scheduler("the other two jobs to be cancelled", cancelled=2)
    assert engine.finished == []  # no other image was completed
    assert 12 not in {seed for batch in engine.batches for seed in batch}  # the third never started


def test_a_failure_during_a_stream_is_raised_by_the_client(fake):
    client, _, engine = fake
    engine.faults.append(RuntimeError("boom"))
    engine.run_freely()
    stream = client.images.generate(prompt="a lighthouse", size=SMALL, stream=True, extra_body=FAST)
    with pytest.raises(openai.APIError, match="Image generation failed"):
        list(stream)


def test_queue_full_is_429_before_any_stream_starts(server):
    engine = FakeEngine(held=True)
    live = server(engine=lambda: engine, max_queue=3, max_batch_size=1)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="any", max_retries=0, timeout=60)
    try:
        # One job runs and one waits, so three more images do not fit in a queue of three.
        earlier = [httpx.post(f"{live.url}/v1/jobs", json={"prompt": f"earlier {i}", **FAST}).json()
                   for i in range(2)]
        live.wait_scheduler("one job running, one waiting", running_batch_size=1, queue_length=1)
        with pytest.raises(openai.RateLimitError) as full:
            client.images.generate(prompt="a lighthouse", size=SMALL, n=3, stream=True, extra_body=FAST)
        assert full.value.body["type"] == "queue_full"
        assert int(full.value.response.headers["Retry-After"]) >= 1
        assert live.scheduler()["queue_length"] == 1  # none of the refused request's images stayed queued
        with pytest.raises(openai.BadRequestError) as too_many:  # more than the queue ever holds
            client.images.generate(prompt="a lighthouse", size=SMALL, n=4, extra_body=FAST)
        assert too_many.value.body["param"] == "n"
        engine.run_freely()
        live.wait_scheduler("the earlier jobs to finish", processed=2)
        for job in earlier:
            assert httpx.get(f"{live.url}/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    finally:
        engine.run_freely()
        client.close()


def test_a_client_leaving_a_stream_cancels_its_images(fake):
    _, live, engine = fake
    body = {"prompt": "a lighthouse", "size": SMALL, "n": 2, "stream": True, **FAST}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{live.url}/v1/images/generations",
                                                        json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        engine.wait_started()  # the first image is being made; the client hangs up
    # The queued image is cancelled at once; the running one at its next step.
    live.wait_scheduler("the server to cancel the queued image", cancelled=1, queue_length=0)
    engine.run_freely()
    live.wait_scheduler("both images to end cancelled", cancelled=2, running_batch_size=0)
    assert engine.finished == []  # the running image stopped at its next step
    assert len(engine.batches) == 1  # the queued one never started
