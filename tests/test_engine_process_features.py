"""Per-request LoRAs and live previews through an engine process, on the tiny model: the front
checks and lists LoRAs from the state its engine sends (resident, unusable, loading, the model's
layers), and previews and partial images cross the pipe with the final image unchanged.

One front with one engine process is shared by the module; `tests/engine_loaders.py` holds its
denoising steps (`gate`) and its LoRA loads (`lora_gate`) on request.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from PIL import Image

from qwen_image_server.api.app import create_app
from qwen_image_server.engine.lora_library import LoraLibrary, LoraState, ModelFacts
from qwen_image_server.engine.process import engine_factories
from tests.conftest import LiveServer, tiny_settings, wait_until
from tests.engine_loaders import GatedLoader

pytestmark = pytest.mark.xdist_group("engine-process-features")
SIZE = "256x256"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Front:
    live: LiveServer
    gate: Path  # while it exists, every denoising step waits in the engine
    lora_gate: Path  # while it exists, every LoRA load waits in the engine

    @property
    def url(self) -> str:
        return self.live.url

    def held(self, gate: Path) -> list[Path]:
        return sorted(gate.parent.glob(f"{gate.name}.held-*"))

    def batches(self) -> int:
        return httpx.get(f"{self.url}/info", timeout=30).json()["engines"][0]["batches"]

    def loras(self) -> dict[str, dict]:
        r = httpx.get(f"{self.url}/v1/loras", timeout=30)
        assert r.status_code == 200, r.text
        return {row["name"]: row for row in r.json()["data"]}

    def image(self, seed: int, loras: list[dict] | None = None) -> bytes:
        body = {"prompt": "a lighthouse", "size": SIZE, "num_inference_steps": 2, "seed": seed,
                **({"loras": loras} if loras is not None else {})}
        r = httpx.post(f"{self.url}/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["data"][0]["b64_json"])

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=30).json()


@pytest.fixture(scope="module")
def front(tmp_path_factory, lora_dir) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("engine-process-features")
    gate, lora_gate = tmp / "gate", tmp / "lora-gate"
    settings = tiny_settings(tmp, lora_dir=lora_dir, max_loras_per_request=2, max_resident_loras=4)
    app = create_app(settings, engines=engine_factories(settings, [None], GatedLoader(gate, lora_gate)))
    live = LiveServer(app).start()
    yield Front(live, gate, lora_gate)
    gate.unlink(missing_ok=True)
    lora_gate.unlink(missing_ok=True)
    live.stop()


# -- LoRAs ------------------------------------------------------------------------------------

def test_a_lora_used_in_the_engine_is_listed_resident(front):
    assert front.loras()["style"]["resident"] == []
    plain = front.image(3)
    assert front.image(3, [{"name": "style"}]) != plain
    style = front.loras()["style"]
    assert style["resident"] == ["tiny"] and style["resident_engines"] == [0] and style["fits"] == ["tiny"]


@pytest.mark.parametrize(("name", "words", "fits"), [
    ("edit-style", "is for Qwen-Image-Edit; the model 'tiny' is Qwen-Image", ["tiny-edit"]),
    ("foreign", "for another model", []),
])
def test_a_lora_for_another_model_is_refused_before_it_is_queued(front, name, words, fits):
    batches = front.batches()
    r = httpx.post(f"{front.url}/v1/jobs", json={"prompt": "a lighthouse", "loras": [{"name": name}]}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "loras[0].name" and words in error["message"], error
    assert front.batches() == batches  # the engine never saw it
    assert front.loras()[name]["fits"] == fits


def test_a_broken_lora_is_refused_listed_unusable_and_the_next_image_is_unchanged(front):
    before = front.image(31)
    r = httpx.post(f"{front.url}/v1/images/generations", timeout=120, json={
        "prompt": "a lighthouse", "size": SIZE, "num_inference_steps": 2, "seed": 31,
        "loras": [{"name": "broken"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "lora_unusable" and "'broken'" in error["message"], error
    listed = front.loras()["broken"]
    assert not listed["usable"] and "loading it failed" in listed["problem"] and listed["resident"] == []
    assert front.image(31) == before
    # Now the front knows: refused before it is queued, naming the field.
    batches = front.batches()
    r = httpx.post(f"{front.url}/generate", json={"prompt": "x", "loras": [{"name": "broken"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras[0].name", r.text
    assert front.batches() == batches


def test_a_job_says_while_its_engine_loads_its_lora(front, lora_dir):
    fresh = lora_dir / "arrived-late.safetensors"
    fresh.write_bytes((lora_dir / "ink.safetensors").read_bytes())
    front.lora_gate.touch()
    try:
        r = httpx.post(f"{front.url}/v1/jobs", json={"prompt": "a lighthouse", "num_inference_steps": 2,
                                                      "loras": [{"name": "arrived-late"}]}, timeout=30)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        wait_until(lambda: front.job(job)["loading_lora"] == "arrived-late", 60,
                   "the job to say it waits for its LoRA")
        assert front.job(job)["status"] == "running" and front.held(front.lora_gate)
        front.lora_gate.unlink()
        wait_until(lambda: front.job(job)["status"] == "succeeded", 120, "the job to finish")
        assert front.job(job)["loading_lora"] is None
        assert front.loras()["arrived-late"]["resident"] == ["tiny"]
    finally:
        front.lora_gate.unlink(missing_ok=True)
        fresh.unlink()


# -- previews ---------------------------------------------------------------------------------

def test_latent_previews_cross_the_engine_process_and_the_final_image_is_unchanged(front):
    body = {"prompt": "a paper boat", "num_inference_steps": 4, "seed": 11, "add_overlay": False,
            "aspect_ratio": "s1:1"}
    front.gate.touch()
    try:
        created = httpx.post(f"{front.url}/v1/jobs", json={**body, "preview": "latent"}, timeout=60)
        assert created.status_code == 202, created.text
        with httpx.Client(timeout=120) as client, connect_sse(
                client, "GET", f"{front.url}/v1/jobs/{created.json()['id']}/events") as source:
            stream = ((e.event, json.loads(e.data)) for e in source.iter_sse())
            first = next(stream)
            front.gate.unlink()
            events = [first, *stream]
    finally:
        front.gate.unlink(missing_ok=True)
    final = events[-1][1]
    assert events[-1][0] == "succeeded", events[-1]
    previews = [data for name, data in events if name == "preview"]
    assert previews and previews[-1]["step"] == 4, [name for name, _ in events]
    for preview in previews:
        assert preview["mode"] == "latent" and preview["id"] == final["id"]
        image = Image.open(io.BytesIO(base64.b64decode(preview["b64_json"])))
        assert image.size == (preview["width"], preview["height"])
    with_previews = httpx.get(final["image_url"], timeout=60).content
    plain = httpx.post(f"{front.url}/generate", json=body, timeout=120)
    assert plain.status_code == 200 and with_previews.startswith(PNG_MAGIC)
    assert with_previews == plain.content


def test_openai_partial_images_stream_through_the_engine_process(front):
    extra = {"num_inference_steps": 4, "seed": 21}
    with openai.OpenAI(base_url=f"{front.url}/v1", api_key="any", max_retries=0, timeout=120) as client:
        events = list(client.images.generate(prompt="a paper boat", size=SIZE, stream=True, partial_images=2,
                                             extra_body=extra))
        plain = client.images.generate(prompt="a paper boat", size=SIZE, extra_body=extra)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (256, 256)
    assert events[-1].b64_json == plain.data[0].b64_json


# -- several engines: one library, every engine's state merged ---------------------------------

def test_the_front_library_merges_its_engines_states(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"")
    library = LoraLibrary(tmp_path, {})
    layers = {"transformer_blocks.0.attn.to_q": (64, 64)}
    library.import_state(0, LoraState({"tiny": ModelFacts("generate", layers, ("style",))},
                                      loading={"tiny": "ink"}))
    library.import_state(1, LoraState({"tiny": ModelFacts("generate", layers, ())},
                                      unusable={"ink": (None, "loading it failed (rank 0)")}))
    assert library.resident("style") == ["tiny"] and library.resident_engines("style") == [0]
    assert library.unusable("ink") == "loading it failed (rank 0)"  # one engine found it broken
    assert library.loading(0) == {"tiny": "ink"} and library.loading(1) == {}
    assert library.model_family("tiny") == "Qwen-Image"
    library.forget_engine(0)  # engine 0 ended: nothing is resident or loading there
    assert library.resident("style") == [] and library.loading(0) == {}
    library.import_state(0, LoraState({"tiny": ModelFacts("generate", layers, ())}))
    assert library.unusable("ink") == "loading it failed (rank 0)"  # still marked by engine 1


# -- the generation model's other tasks through the engine process ---------------------------

def _png(array) -> str:
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_controlnet_and_image_to_image_with_a_lora_run_in_the_engine_process(front):
    import numpy as np

    edges = np.zeros((256, 256, 3))
    edges[::32, :] = 255
    start = np.kron(np.random.default_rng(0).integers(0, 256, (8, 8, 3)), np.ones((32, 32, 1)))
    models = {card["id"]: card for card in httpx.get(f"{front.url}/v1/models", timeout=30).json()["data"]}
    assert "controlnet" in models["tiny"]["tasks"]  # the engine's ControlNet, as the front sees it

    def made(**extra) -> bytes:
        body = {"prompt": "a lighthouse", "size": SIZE, "num_inference_steps": 2, "seed": 6,
                "loras": [{"name": "style", "scale": 0.8}], **extra}
        r = httpx.post(f"{front.url}/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["data"][0]["b64_json"])

    plain, steered, again = made(), made(control_image=_png(edges)), made(control_image=_png(edges))
    assert steered == again and steered != plain
    assert made(image=_png(start), strength=0.5) not in (plain, steered)
