"""LoRAs chosen per request, on the tiny models with tiny LoRAs made by PEFT (engine/tiny.py's
`build_lora`) and loaded through the same code as real ones: the library (GET /v1/loras), every
API and the CLI, byte-identical images with and without adapters resident, a broken LoRA that
leaves the pipeline as it was, eviction, Lightning's sampler per batch, batching by adapter set,
and hot-swapping under compile without recompiling."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from qwen_image_server.engine.tiny import (
    ensure_tiny_model,
)
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.scheduler import Scheduler, SchedulerConfig
from tests.conftest import (
    LiveServer,
    hold_engine,
    run_cli,
    tiny_settings,
    wait_until,
)
from tests.fakes import FakeEngine

pytestmark = pytest.mark.xdist_group("loras")  # one LoRA server for the module
SIZE = "256x256"
HUB_LIGHTNING = "lightx2v/Qwen-Image-Lightning:Qwen-Image-Lightning-8steps-V1.1.safetensors"


@pytest.fixture(scope="module")
def live(tmp_path_factory, lora_dir) -> Iterator[LiveServer]:
    server = LiveServer(tiny_settings(tmp_path_factory.mktemp("lora-server"), lora_dir=lora_dir,
                                      loras=f"hub-lightning={HUB_LIGHTNING}",
                                      max_loras_per_request=2, max_resident_loras=4)).start()
    yield server
    server.stop()


def image(live: LiveServer, seed: int, loras: list[dict] | None = None, n: int = 1, **extra) -> list[bytes]:
    """PNGs from /v1/images/generations at 256x256, 2 steps, seeds seed..seed+n-1."""
    body = {"prompt": "a lighthouse", "size": SIZE, "num_inference_steps": 2, "seed": seed, "n": n, **extra}
    if loras is not None:
        body["loras"] = loras
    r = httpx.post(f"{live.url}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [base64.b64decode(item["b64_json"]) for item in r.json()["data"]]


def loras_listed(live: LiveServer) -> dict[str, dict]:
    r = httpx.get(f"{live.url}/v1/loras", timeout=30)
    assert r.status_code == 200, r.text
    return {row["name"]: row for row in r.json()["data"]}


def png(size=(64, 64), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# -- the library ---------------------------------------------------------------------------

def test_the_library_lists_each_lora_with_what_it_fits(live):
    listed = loras_listed(live)
    assert set(listed) == {"style", "ink", "tiny-Lightning-4steps", "edit-style", "notalora", "foreign", "broken",
                           "hub-lightning"}
    hub = listed["hub-lightning"]  # not downloaded: what its name says, nothing read yet
    assert (hub["source"], hub["location"], hub["rank"], hub["lightning_steps"]) == ("hub", HUB_LIGHTNING, None, 8)
    style = listed["style"]
    assert (style["source"], style["location"], style["rank"], style["base_model"]) == (
        "folder", "style.safetensors", 4, "Qwen-Image")
    assert style["fits"] == ["tiny"] and style["usable"] and style["problem"] is None
    assert listed["ink"]["rank"] == 8
    assert listed["edit-style"]["fits"] == ["tiny-edit"] and listed["edit-style"]["base_model"] == "Qwen-Image-Edit"
    assert listed["tiny-Lightning-4steps"]["lightning_steps"] == 4
    assert not listed["notalora"]["usable"] and "safetensors" in listed["notalora"]["problem"]
    assert listed["foreign"]["fits"] == [] and "another model" in listed["foreign"]["problem"]


@pytest.mark.parametrize(("value", "words"), [
    ("style", "is not 'name=owner/repo:file.safetensors'"),
    ("a/b=owner/repo:x.safetensors", "may hold only letters"),
    ("x=./local.safetensors", "is not a hub repo id"),
    ("x=o/r,x=o/s", "given twice"),
])
def test_a_bad_hub_lora_list_stops_the_server_naming_the_setting(tmp_path, value, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        tiny_settings(tmp_path, loras=value)
    assert caught.value.errors()[0]["loc"] == ("loras",) and words in str(caught.value)


# -- images: with, without, alone, batched -------------------------------------------------

def test_a_lora_changes_the_image_and_a_request_without_one_matches_a_server_without_loras(live, tiny_server):
    [plain_elsewhere] = image(tiny_server, 11)  # the shared server has no LoRA library
    [styled] = image(live, 11, [{"name": "style", "scale": 1.0}])
    assert loras_listed(live)["style"]["resident"] == ["tiny"]
    [plain_here] = image(live, 11)
    assert styled != plain_here
    assert plain_here == plain_elsewhere  # adapters resident, none active: not a bit differs
    [half] = image(live, 11, [{"name": "style", "scale": 0.5}])
    assert half not in (styled, plain_here)  # the scale is applied


def test_a_lora_image_is_the_same_alone_and_batched(live):
    choice = [{"name": "ink", "scale": 0.8}, {"name": "style", "scale": 0.6}]
    batched = image(live, 20, choice, n=3)  # one request's images run as one batch
    assert live.hook.calls[-1] == [20, 21, 22]
    [alone] = image(live, 21, list(reversed(choice)))  # the order named does not matter
    assert live.hook.calls[-1] == [21]
    assert alone == batched[1]


def test_a_broken_lora_is_refused_and_leaves_the_pipeline_as_it_was(live):
    [before] = image(live, 31)
    [styled_before] = image(live, 31, [{"name": "style"}])
    r = httpx.post(f"{live.url}/v1/images/generations", timeout=120, json={
        "prompt": "a lighthouse", "size": SIZE, "num_inference_steps": 2, "seed": 31,
        "loras": [{"name": "broken"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "loras" and error["code"] == "lora_unusable" and "'broken'" in error["message"]
    listed = loras_listed(live)["broken"]
    assert not listed["usable"] and "loading it failed" in listed["problem"] and listed["resident"] == []
    assert image(live, 31) == [before]
    assert image(live, 31, [{"name": "style"}]) == [styled_before]
    # Now known: refused before it is queued, naming the field.
    r = httpx.post(f"{live.url}/generate", json={"prompt": "x", "loras": [{"name": "broken"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras[0].name", r.text


def _unreachable() -> Exception:
    return ConnectionError("[Errno 101] Network is unreachable")


def _no_such_repo() -> Exception:
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    url = "https://huggingface.co/api/models/lightx2v/Qwen-Image-Lightning"
    return RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {url}",
                                   response=httpx2.Response(404, request=httpx2.Request("GET", url)))


@pytest.mark.parametrize(("failure", "status", "code"), [
    (_unreachable, 503, "lora_unavailable"),  # the network or the hub is down: try again later
    (_no_such_repo, 400, "lora_unusable"),  # the hub says the repo is not there: the LoRA's fault
])
def test_a_hub_lora_that_cannot_be_fetched_is_503_while_the_hub_is_down_400_when_it_is_not_there(
        live, monkeypatch, failure, status, code):
    import huggingface_hub

    def fetch(*args, **kwargs):
        raise failure()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    [before] = image(live, 41)
    r = httpx.post(f"{live.url}/v1/images/generations", timeout=120, json={
        "prompt": "a lighthouse", "size": SIZE, "seed": 41, "loras": [{"name": "hub-lightning"}]})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and "'hub-lightning'" in error["message"], error
    assert ("Retry-After" in r.headers) == (status == 503)
    listed = loras_listed(live)["hub-lightning"]
    assert listed["usable"] and listed["resident"] == []  # neither marks it unusable for good
    assert image(live, 41) == [before]


# -- bad input: a clear 400 naming the field, the next request unharmed ----------------------

@pytest.mark.parametrize(("loras", "param", "words"), [
    ([{"name": "nope"}], "loras[0].name", "no LoRA named 'nope'; available: broken, edit-style"),
    ([{"name": "style", "scale": 9}], "loras[0].scale", "less than or equal to 4"),
    ([{"name": "style"}, {"name": "ink"}, {"name": "tiny-Lightning-4steps"}], "loras", "at most 2"),
    ([{"name": "style"}, {"name": "style", "scale": 0.5}], "loras[1].name", "named twice"),
    ([{"name": "../style"}], "loras[0].name", "never by a path"),
    ([{"name": "loras/style"}], "loras[0].name", "never by a path"),
    ([{"name": "style", "weight": 1}], "loras[0].weight", "Extra inputs"),
    ("style", "loras", "should be a valid"),  # a list (form, python) or an array (JSON)
    ([{"name": "edit-style"}], "loras[0].name", "is for Qwen-Image-Edit; the model 'tiny' is Qwen-Image"),
    ([{"name": "foreign"}], "loras[0].name", "for another model"),
    ([{"name": "notalora"}], "loras[0].name", "not a readable safetensors file"),
])
@pytest.mark.parametrize("path", ["/generate", "/v1/jobs", "/v1/images/generations"])
def test_bad_loras_get_a_400_naming_the_field(live, path, loras, param, words):
    r = httpx.post(f"{live.url}{path}", json={"prompt": "a lighthouse", "loras": loras}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
    assert httpx.get(f"{live.url}/health", timeout=30).json()["status"] == "healthy"


def test_an_edit_takes_edit_loras_and_refuses_generation_ones(live):
    files = {"image": ("in.png", png(), "image/png")}
    data = {"prompt": "make it blue", "num_inference_steps": "2", "loras": json.dumps([{"name": "edit-style"}])}
    r = httpx.post(f"{live.url}/edit", data=data, files=files, timeout=120)
    assert r.status_code == 200, r.text
    assert live.hook.specs[-1].loras == (("edit-style", 1.0),) and live.hook.specs[-1].task == "edit"
    data["loras"] = json.dumps([{"name": "style"}])
    r = httpx.post(f"{live.url}/edit", data=data, files=files, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras[0].name", r.text
    assert "is for Qwen-Image; the model 'tiny-edit' is Qwen-Image-Edit" in r.json()["error"]["message"]


# -- the official openai client, jobs and the CLI ------------------------------------------

def test_the_openai_client_sends_loras_in_extra_body(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    result = client.images.generate(prompt="a lighthouse", size=SIZE, extra_body={
        "loras": [{"name": "style", "scale": 0.7}], "num_inference_steps": 2, "seed": 5})
    assert result.data[0].b64_json and live.hook.specs[-1].loras == (("style", 0.7),)
    edited = client.images.edit(image=("in.png", png(), "image/png"), prompt="make it blue", extra_body={
        "loras": [{"name": "edit-style", "scale": 0.5}], "num_inference_steps": 2, "seed": 5})
    assert edited.data[0].b64_json and live.hook.specs[-1].loras == (("edit-style", 0.5),)


def test_a_job_says_while_it_waits_for_its_lora_to_load(live, lora_dir, monkeypatch):
    # A LoRA dropped into the folder while the server runs: listed at once, loaded on first use.
    fresh = lora_dir / "just-added.safetensors"
    fresh.write_bytes((lora_dir / "style.safetensors").read_bytes())
    adapters = live.hook.engine.engines["tiny"].adapters
    gate = threading.Event()
    load = adapters._load

    def held_load(name, path):  # the load waits until the test has seen the job's status
        assert gate.wait(60), "the test never let the load finish"
        return load(name, path)

    monkeypatch.setattr(adapters, "_load", held_load)
    try:
        assert loras_listed(live)["just-added"]["resident"] == []
        r = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "a lighthouse", "num_inference_steps": 2,
                                                     "loras": [{"name": "just-added"}]}, timeout=30)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        status = {}

        def loading() -> bool:
            status.update(httpx.get(f"{live.url}/v1/jobs/{job}", timeout=30).json())
            return status["loading_lora"] == "just-added"

        try:
            wait_until(loading, 60, "the job to say it waits for its LoRA")
            assert status["status"] == "running" and status["progress"]["step"] == 0
        finally:
            gate.set()
        wait_until(lambda: httpx.get(f"{live.url}/v1/jobs/{job}", timeout=30).json()["status"] == "succeeded",
                   120, "the job to finish")
        assert httpx.get(f"{live.url}/v1/jobs/{job}", timeout=30).json()["loading_lora"] is None
        assert loras_listed(live)["just-added"]["resident"] == ["tiny"]
    finally:
        fresh.unlink()


def test_cli_lora_flag_locally_and_on_a_server(live, lora_dir, tmp_path, capsys):
    common = ["a lighthouse", "--num-inference-steps", "2", "--seed", "8", "--lora", "style:0.8",
              "--lora-dir", str(lora_dir), "--output-dir", str(tmp_path)]
    assert run_cli("generate", *common, "--url", live.url, "--out", str(tmp_path / "remote.png")) == 0
    assert live.hook.specs[-1].loras == (("style", 0.8),)
    assert run_cli("generate", *common, "--out", str(tmp_path / "local.png")) == 0
    assert (tmp_path / "local.png").read_bytes() == (tmp_path / "remote.png").read_bytes()
    capsys.readouterr()
    assert run_cli("generate", "x", "--url", live.url, "--lora", "nope") == 1
    assert "no LoRA named 'nope'" in capsys.readouterr().err


# -- Lightning: its sampler and defaults for its batch only ----------------------------------

def test_a_lightning_lora_switches_its_batch_to_the_distilled_sampler(live):
    pipeline = live.hook.engine.engines["tiny"].pipeline
    shift = pipeline.scheduler.config["base_shift"]
    with hold_engine(live) as hook:
        r = httpx.post(f"{live.url}/v1/jobs", timeout=30, json={
            "prompt": "a lighthouse", "loras": [{"name": "tiny-Lightning-4steps"}]})
        assert r.status_code == 202 and r.json()["progress"]["total"] == 4, r.text
        # Held at its first step: the batch's sampler is in place until the call ends.
        wait_until(lambda: pipeline.scheduler.config["base_shift"] != shift, 60, "the Lightning batch to start")
        during = dict(pipeline.scheduler.config)
    assert during["base_shift"] == pytest.approx(math.log(3)) and during["shift_terminal"] is None
    spec = hook.specs[-1]
    assert (spec.num_inference_steps, spec.true_cfg_scale) == (4, 1.0)  # the LoRA's card
    job = r.json()["id"]
    wait_until(lambda: httpx.get(f"{live.url}/v1/jobs/{job}", timeout=30).json()["status"] == "succeeded",
               120, "the Lightning job")
    assert pipeline.scheduler.config["base_shift"] == shift  # restored for the next batch
    r = httpx.post(f"{live.url}/v1/jobs", timeout=30, json={"prompt": "x"})
    assert r.json()["progress"]["total"] == 20  # requests without it keep the server's defaults


# -- eviction ------------------------------------------------------------------------------

def test_least_recently_used_loras_are_unloaded_beyond_the_limit(server, lora_dir):
    live = server(lora_dir=lora_dir, max_resident_loras=1)
    [first] = image(live, 3, [{"name": "style"}])
    assert loras_listed(live)["style"]["resident"] == ["tiny"]
    image(live, 3, [{"name": "ink"}])
    listed = loras_listed(live)
    assert listed["ink"]["resident"] == ["tiny"] and listed["style"]["resident"] == []
    assert image(live, 3, [{"name": "style"}]) == [first]  # loaded again, same image
    listed = loras_listed(live)
    assert listed["style"]["resident"] == ["tiny"] and listed["ink"]["resident"] == []


# -- batching by adapter set (the fake engine: exact) ----------------------------------------

def test_batches_group_by_adapter_set_and_keep_the_fairness_bound():
    engine = FakeEngine(held=True)
    scheduler = Scheduler(lambda: engine, SchedulerConfig(max_queue=32, max_batch_size=4,
                                                          max_batch_pixels=64 * 512 * 512))
    scheduler.start()
    try:
        def spec(seed: int, loras=()) -> GenerationSpec:
            return GenerationSpec(f"p{seed}", " ", 512, 512, 2, 4.0, seed, loras=loras)

        style, ink = (("style", 1.0),), (("ink", 0.5), ("style", 1.0))
        blocker = scheduler.submit(spec(0), 0)
        engine.wait_started()
        sets = [style, (), ink, style, (), (("style", 0.5),), ink, style]
        jobs = [scheduler.submit(spec(i, loras), i) for i, loras in enumerate(sets, start=1)]
        engine.run_freely()
        for job in [blocker, *jobs]:
            job.future.result(timeout=5)
    finally:
        scheduler.stop()
        scheduler.join(5)
    # Equal sets at equal scales batch together; a different scale is a different set.
    assert engine.batches == [[0], [1, 4, 8], [2, 5], [3, 7], [6]]
    for position, job in enumerate(jobs):
        assert [job.spec.seed in batch for batch in engine.batches[1:]].index(True) <= position


# -- compiled: hot-swapping compiles nothing -------------------------------------------------

def test_switching_adapters_under_compile_compiles_nothing(tmp_path, lora_dir, monkeypatch):
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_server.engine import compilation
    from qwen_image_server.engine.models import load_engine

    # dynamo's "eager" backend: its guards (what recompiles) are the real ones, without inductor.
    original = QwenImageTransformer2DModel.compile_repeated_blocks
    monkeypatch.setattr(QwenImageTransformer2DModel, "compile_repeated_blocks",
                        lambda self, **kw: original(self, **{**kw, "backend": "eager"}))
    torch.compiler.reset()
    base = dict(model="tiny=tiny", max_batch_size=1, max_batch_pixels=256 * 256, lora_dir=lora_dir)
    eager = load_engine(tiny_settings(tmp_path, **base)).engines["tiny"]
    compiled = load_engine(tiny_settings(tmp_path, compile=True, max_loras_per_request=2,
                                         lora_max_rank=8, **base)).engines["tiny"]
    spec = GenerationSpec("a lighthouse", " ", 256, 256, 2, 4.0, seed=4)
    compiled.run_batch([spec], lambda event: None)  # compiles this size (the warm-up did 512x512)
    warmed = compilation.compiled_graphs()
    # Compile really happened (else "nothing recompiled" below would hold trivially): graphs were
    # made, and the transformer's blocks run through their compiled call.
    blocks = compiled.pipeline.transformer.transformer_blocks
    assert warmed > 0 and all(block._compiled_call_impl is not None for block in blocks)
    sets = [(), (("style", 0.8),), (("ink", 1.0), ("style", 0.5)), (("ink", 1.0),), ()]
    images = []
    for loras in sets:
        one = dataclasses.replace(spec, loras=loras)
        [want] = eager.run_batch([one], lambda event: None)
        [got] = compiled.run_batch([one], lambda event: None)
        want, got = np.asarray(want).astype(int), np.asarray(got).astype(int)
        if loras:
            # The slot holds lora_B * scale: the same sum in another rounding order.
            assert np.abs(got - want).max() <= 2, loras
        else:
            assert np.array_equal(got, want)  # empty slots add exact zeros
        images.append(got)
    assert all(not np.array_equal(images[0], other) for other in images[1:4])  # each set took effect
    assert len({image.tobytes() for image in images[1:4]}) == 3
    assert compilation.compiled_graphs() == warmed  # four switches, nothing compiled


def test_a_lora_above_the_slot_rank_is_refused_before_it_is_queued(lora_dir):
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_server.engine.lora_library import LoraLibrary

    library = LoraLibrary(lora_dir, {}, max_rank=4)
    transformer = QwenImageTransformer2DModel.from_pretrained(
        ensure_tiny_model(tiny_settings(lora_dir).cache_dir) / "transformer")
    library.add_model("tiny", "generate", transformer)
    assert library.problem("style", "tiny") is None  # rank 4
    assert "has rank 8; this compiled server takes LoRAs up to rank 4" in library.problem("ink", "tiny")


def test_a_lora_folder_that_is_not_there_is_named_in_a_warning_at_start(tmp_path, caplog):
    from qwen_image_server.api.app import create_app

    typo = tmp_path / "lroas"
    with caplog.at_level("WARNING", logger="qwen_image_server"):
        create_app(tiny_settings(tmp_path, lora_dir=typo))
    assert f"QWEN_IMAGE_LORA_DIR={typo} is not a folder (yet)" in caplog.text

    caplog.clear()
    typo.mkdir()
    with caplog.at_level("WARNING", logger="qwen_image_server"):
        create_app(tiny_settings(tmp_path, lora_dir=typo))
    assert "QWEN_IMAGE_LORA_DIR" not in caplog.text


def test_lora_switches_are_counted_per_engine(live):
    def switches() -> float:
        text = httpx.get(f"{live.url}/metrics", timeout=30).text
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "qwen_image_lora_switches_total" and s.labels == {"engine": "0"})

    image(live, 5)  # whatever ran before: now no LoRA is active
    before = switches()
    image(live, 5, [{"name": "style", "scale": 1.0}])  # on
    image(live, 6, [{"name": "style", "scale": 1.0}])  # the same: no switch
    image(live, 5, [{"name": "style", "scale": 0.5}])  # another scale: a switch
    image(live, 5)  # off
    assert switches() - before == 3

