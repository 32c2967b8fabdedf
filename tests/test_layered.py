"""Qwen-Image-Layered on the embedded tiny layered model (QwenImageLayeredPipeline, its RGBA VAE),
served by the default QWEN_IMAGE_MODEL=tiny: one image in, N RGBA layers out, through the OpenAI
edits route and the official client, the jobs route (progress, latent previews, the ZIP and the
stacked image, owned by the API key that made them) and the CLI.

The pipeline sizes its layers from a resolution bucket (640 or 1024 pixels a side); here its
sizing is shrunk to 128x128 (diffusers' module function and the server's copy of it), as the
edit tests shrink the edit pipelines' working size: the server's path is the same."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from httpx_sse import connect_sse
from PIL import Image

from qwen_image_server.cli import main
from tests.conftest import LiveServer, hold_engine, run_cli, tiny_settings

STEPS = 2
KEY, OTHER_KEY = "layered-owner-key-3f9a1c", "layered-other-key-8d2e7b"


@contextlib.contextmanager
def small_layers() -> Iterator[None]:
    """Layers of 128x128 pixels (not the pipeline's 640 or 1024) for in-process servers, meanwhile."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as pipeline_module

    from qwen_image_server.serving import specs

    real_pipeline, real_server = pipeline_module.calculate_dimensions, specs.layered_size
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_module, "calculate_dimensions", lambda area, ratio: real_pipeline(128 * 128, ratio))
        patch.setattr(specs, "layered_size", lambda size, resolution: real_server(size, 128))
        yield


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    with small_layers():
        live = LiveServer(tiny_settings(tmp_path_factory.mktemp("layered"), api_keys=[KEY, OTHER_KEY])).start()
        live.headers = {"Authorization": f"Bearer {KEY}"}
        yield live
        live.stop()


@pytest.fixture(scope="module")
def oai(layered):
    return openai.OpenAI(base_url=f"{layered.url}/v1", api_key=KEY, max_retries=0)


def picture(seed: int, size=(96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    pixels[..., 3] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def split(oai, seed: int, layers: int = 3, image: bytes | None = None, prompt: str = "a cat on a sofa"):
    return oai.images.edit(image=("photo.png", image or picture(1), "image/png"), prompt=prompt,
                           model="tiny-layered", extra_body={"layers": layers, "num_inference_steps": STEPS,
                                                             "seed": seed})


def client(live: LiveServer, key: str = KEY) -> httpx.Client:
    return live.client(headers={"Authorization": f"Bearer {key}"})


def start_job(http: httpx.Client, seed: int, layers: int = 3, **fields) -> dict:
    form = {"model": "tiny-layered", "layers": str(layers), "num_inference_steps": str(STEPS), "seed": str(seed),
            "prompt": "a cat on a sofa", **fields}
    response = http.post("/v1/jobs/layers", files=[("image", ("photo.png", picture(1), "image/png"))], data=form)
    assert response.status_code == 202, response.text
    return response.json()


def events(http: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as stream:
        return [(event.event, json.loads(event.data)) for event in stream.iter_sse()]


def zip_layers(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(name, archive.read(name)) for name in archive.namelist()]


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
    with client(layered) as http:
        for fields, param in (({"layers": "11"}, "layers"), ({"layers": "1"}, "layers"),
                              ({"stream": "true"}, "stream")):
            response = http.post("/v1/images/edits", files=[("image", ("a.png", picture(2), "image/png"))],
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


def test_the_default_tiny_serves_the_layered_model_beside_the_others(layered):
    with client(layered) as http:
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert list(cards) == ["tiny", "tiny-edit", "tiny-layered"]
    assert cards["tiny-layered"]["tasks"] == ["layered"]
    assert cards["tiny-layered"]["pipeline"] == "QwenImageLayeredPipeline"


def test_without_a_prompt_the_layered_model_captions_the_picture_and_other_models_refuse(oai, layered):
    answer = split(oai, seed=4, prompt="")
    assert len(answer.data) == 3 and answer.data[0].revised_prompt is None
    with client(layered) as http:
        response = http.post("/v1/images/edits", files=[("image", ("a.png", picture(2), "image/png"))],
                             data={"model": "tiny-edit"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text


def test_a_layered_job_streams_every_step_and_latent_previews_then_gives_a_zip_and_a_stacked_png(oai, layered):
    with client(layered) as http:
        job = start_job(http, seed=7, preview="latent")
        seen = events(http, job["id"])
        names = [name for name, _ in seen]
        assert names[-1] == "succeeded", seen
        assert [data["progress"]["step"] for name, data in seen if name == "step"] == list(range(1, STEPS + 1))
        assert {data["progress"]["phase"] for name, data in seen if name == "step"} == {"denoising"}
        previews = [data for name, data in seen if name == "preview"]
        assert previews and previews[0]["mode"] == "latent"
        status = seen[-1][1]
        # The preview shows the 3 layers side by side, a quarter of their size.
        assert (previews[0]["width"], previews[0]["height"]) == (3 * status["width"] // 4, status["height"] // 4)
        archive = http.get(f"/v1/jobs/{job['id']}/layers.zip")
        stacked = http.get(status["image_url"])
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    members = zip_layers(archive.content)
    assert [name for name, _ in members] == ["layer-0.png", "layer-1.png", "layer-2.png"]
    layers = [Image.open(io.BytesIO(data)) for _, data in members]
    assert {layer.mode for layer in layers} == {"RGBA"} and len({layer.size for layer in layers}) == 1
    # The same layers as the OpenAI route's for the same seed, byte for byte.
    assert [data for _, data in members] == [base64.b64decode(item.b64_json) for item in split(oai, seed=7).data]
    picture_ = Image.open(io.BytesIO(stacked.content))
    assert stacked.headers["content-type"] == "image/png" and picture_.size == layers[0].size
    assert (status["width"], status["height"]) == layers[0].size
    expected = layers[0]
    for layer in layers[1:]:
        expected = Image.alpha_composite(expected, layer)
    assert np.array_equal(np.asarray(picture_.convert("RGBA")), np.asarray(expected))


def test_a_job_without_a_prompt_shows_its_captioning_then_denoises(layered):
    with client(layered) as http, hold_engine(layered) as hook:
        blocker = start_job(http, seed=1, layers=2)  # holds the engine at its first step
        layered.wait_running()
        job = start_job(http, seed=2, prompt="")
        with connect_sse(http, "GET", f"/v1/jobs/{job['id']}/events") as stream:
            seen = []
            for event in stream.iter_sse():
                seen.append((event.event, json.loads(event.data)))
                if event.event == "queued":
                    hook.release()
        assert seen[-1][0] == "succeeded", seen
        [started] = [data for name, data in seen if name == "started"]
        assert started["progress"] == {"step": 0, "total": STEPS, "phase": "captioning"}
        assert [data["progress"]["phase"] for name, data in seen if name == "step"] == ["denoising"] * STEPS
        assert seen[-1][1]["progress"]["phase"] is None
        assert http.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "succeeded"


def test_another_key_cannot_see_a_layered_job_or_fetch_its_layers(layered):
    with client(layered) as http:
        job = start_job(http, seed=3, layers=2)
        assert events(http, job["id"])[-1][0] == "succeeded"
        assert http.get(f"/v1/jobs/{job['id']}/layers.zip").status_code == 200
    with client(layered, OTHER_KEY) as other:
        for path in ("layers.zip", "image", ""):
            response = other.get(f"/v1/jobs/{job['id']}/{path}".rstrip("/"))
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "job_not_found"


def test_a_generation_job_has_no_layers_and_a_full_preview_is_refused(layered):
    with client(layered) as http:
        job = http.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 1, "aspect_ratio": "s1:1"}).json()
        assert events(http, job["id"])[-1][0] == "succeeded"
        assert http.get(f"/v1/jobs/{job['id']}/layers.zip").json()["error"]["code"] == "job_layers_not_found"
        response = http.post("/v1/jobs/layers", files=[("image", ("a.png", picture(2), "image/png"))],
                             data={"preview": "full"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "preview", response.text


def test_the_cli_writes_each_layer_and_the_stacked_picture(layered, tmp_path):
    source = tmp_path / "photo.png"
    source.write_bytes(picture(1))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["layers", str(source), "--layers", "3", "--num-inference-steps", str(STEPS), "--seed", "7",
              "--prompt", "a cat on a sofa", "--out", str(out), "--url", layered.url, "--api-keys", KEY])
    assert done.value.code == 0
    assert sorted(path.name for path in out.iterdir()) == ["layer-0.png", "layer-1.png", "layer-2.png", "stacked.png"]
    with client(layered) as http:
        job = start_job(http, seed=7)
        events(http, job["id"])
        members = dict(zip_layers(http.get(f"/v1/jobs/{job['id']}/layers.zip").content))
    assert {name: (out / name).read_bytes() for name in members} == members


def test_the_cli_splits_here_without_a_server_into_the_same_files(layered, tmp_path, capsys):
    """Without --url the command loads the layered model itself (QWEN_IMAGE_MODEL=tiny's
    tiny-layered): the same model, seed and picture give the files a server gives, byte for byte."""
    source = tmp_path / "photo.png"
    source.write_bytes(picture(1))
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["layers", str(source), "--layers", "2", "--num-inference-steps", str(STEPS), "--seed", "11",
              "--prompt", "a cat on a sofa"]
    assert run_cli(*common, "--out", str(local), "--threads", "1") == 0
    assert "saved 2 layers and stacked.png" in capsys.readouterr().out
    assert run_cli(*common, "--out", str(remote), "--url", layered.url, "--api-keys", KEY) == 0
    names = ["layer-0.png", "layer-1.png", "stacked.png"]
    assert sorted(path.name for path in local.iterdir()) == names
    assert {name: (local / name).read_bytes() for name in names} == {name: (remote / name).read_bytes()
                                                                      for name in names}
    assert Image.open(local / "layer-1.png").mode == "RGBA"

    assert run_cli("layers", str(source), "--model", "tiny-edit", "--out", str(tmp_path / "no")) == 1
    assert "layered" in capsys.readouterr().err  # no layered model loaded: says so, writes nothing
    assert not (tmp_path / "no").exists()


def test_a_layered_job_stored_before_a_restart_runs_after_it(layered, tmp_path):
    """A queued layered job the job store kept (as a server killed before running it leaves it)
    is prepared again from its stored parameters and picture, and runs, prompt-less, on start."""
    import time
    import uuid

    from qwen_image_server.job_state import JobState
    from qwen_image_server.protocol.native import LayeredJobParameters
    from qwen_image_server.serving.job_store import SqliteJobStore, StoredJob
    from qwen_image_server.serving.uploads import Upload
    from tests.conftest import final_status

    settings = tiny_settings(tmp_path)
    body = LayeredJobParameters.model_validate({"layers": "2", "num_inference_steps": STEPS, "seed": 5,
                                                "model": "tiny-layered"})
    job_id = uuid.uuid4().hex
    SqliteJobStore(settings.data_dir).add(
        StoredJob(id=job_id, owner=None, task="layered", body=body.model_dump_json(exclude_unset=True),
                  request_id=1, created_at=time.time(), state=JobState.QUEUED, runs=0),
        [Upload("image", picture(1))], None)
    live = LiveServer(settings).start()
    try:
        status = final_status(live.url, job_id)
        assert status["status"] == "succeeded" and status["seed"] == 5, status
        with live.client() as http:
            members = zip_layers(http.get(f"/v1/jobs/{job_id}/layers.zip").content)
        assert [name for name, _ in members] == ["layer-0.png", "layer-1.png"]
    finally:
        live.stop()
