"""The prompt cache on the tiny model, through the server: a repeated prompt (and the default
negative prompt) skips the text encoder, counted by a hook on the encoder itself and in /metrics,
and every image is byte-identical with the cache on and off, in batches of mixed prompts and n>1."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qwen_image_server.engine.prompt_cache import PromptCache
from tests.conftest import LiveServer, tiny_settings
from tests.test_metrics import scrape, value

FAST = {"num_inference_steps": 2, "add_overlay": False, "width": 64, "height": 64}
PROMPTS = ["a red fox in the snow", "a lighthouse", "a red fox in the snow", "a bowl of ramen with an egg"]


class Encoder:
    """Counts the text encoder's forward calls of an in-process server's model."""

    def __init__(self, live: LiveServer) -> None:
        self.calls = 0
        engine = live.hook.engine
        engine.first.pipeline.text_encoder.register_forward_hook(self._count)

    def _count(self, *args: object) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, LiveServer]]:
    made = {
        "on": LiveServer(tiny_settings(tmp_path_factory.mktemp("cache-on"), batch_wait_ms=300)).start(),
        "off": LiveServer(tiny_settings(tmp_path_factory.mktemp("cache-off"), batch_wait_ms=300,
                                        prompt_cache_mb=0)).start(),
    }
    yield made
    for live in made.values():
        live.stop()


def generate_all(live: LiveServer) -> list[bytes]:
    """The PROMPTS sent at once (they batch), then one with n=2: every image's PNG bytes."""
    def one(i: int) -> bytes:
        r = httpx.post(f"{live.url}/generate", json={"prompt": PROMPTS[i], "seed": i, **FAST}, timeout=120)
        assert r.status_code == 200, r.text
        return r.content

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        images = list(pool.map(one, range(len(PROMPTS))))
    r = httpx.post(f"{live.url}/v1/images/generations", timeout=120, json={
        "prompt": "a lighthouse", "n": 2, "size": "256x256", "response_format": "b64_json",
        "num_inference_steps": 2, "seed": 7})
    assert r.status_code == 200, r.text
    import base64

    return images + [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]


def test_images_are_byte_identical_with_the_cache_on_and_off(servers):
    assert generate_all(servers["on"]) == generate_all(servers["off"])
    # Some of those calls were batches of several prompts (else this test proves less).
    assert any(len(call) > 1 for call in servers["on"].hook.calls)


def test_a_repeated_prompt_skips_the_text_encoder_and_metrics_count_it(servers):
    live = servers["on"]
    # Any earlier request has encoded the default negative prompt, which then stays resident.
    assert httpx.post(f"{live.url}/generate", json={"prompt": "an earlier prompt", **FAST}, timeout=120).is_success
    encoder = Encoder(live)
    body = {"prompt": "a prompt seen twice", "seed": 1, **FAST}
    first = httpx.post(f"{live.url}/generate", json=body, timeout=120)
    assert encoder.calls == 1  # the prompt; the default negative prompt was resident already
    with httpx.Client(base_url=live.url) as c:
        before = scrape(c)
        again = httpx.post(f"{live.url}/generate", json={**body, "seed": 2}, timeout=120)
        after = scrape(c)
    assert first.status_code == again.status_code == 200
    assert encoder.calls == 1  # the text encoder did not run again
    hits = value(after, "qwen_image_prompt_cache_hits_total", engine="0") - value(
        before, "qwen_image_prompt_cache_hits_total", engine="0")
    misses = value(after, "qwen_image_prompt_cache_misses_total", engine="0") - value(
        before, "qwen_image_prompt_cache_misses_total", engine="0")
    assert (hits, misses) == (2, 0)  # the prompt and the negative prompt


def test_the_cache_off_runs_the_encoder_for_every_prompt(servers):
    live = servers["off"]
    encoder = Encoder(live)
    for seed in (1, 2):
        r = httpx.post(f"{live.url}/generate", json={"prompt": "again and again", "seed": seed, **FAST}, timeout=120)
        assert r.status_code == 200
    assert encoder.calls == 4  # prompt and negative prompt, twice


def test_the_least_recently_used_prompt_goes_first_and_pinned_ones_stay():
    import torch

    encoded: list[str] = []

    def encode(prompt: str) -> torch.Tensor:
        encoded.append(prompt)
        return torch.zeros(4, 16)  # 256 bytes

    cache = PromptCache(max_bytes=3 * 256, pinned=[" "])
    cache.embeddings([" ", "a", "b"], encode)
    cache.embeddings(["a"], encode)  # a is now more recent than b
    cache.embeddings(["c"], encode)  # over budget: b goes, the pinned " " stays
    cache.embeddings([" ", "a", "c", "b"], encode)
    assert encoded == [" ", "a", "b", "c", "b"]
    cache.invalidate_unless(("text encoder adapters", "style"))  # the encoder changed: all goes
    cache.embeddings([" "], encode)
    assert encoded[-1] == " "
