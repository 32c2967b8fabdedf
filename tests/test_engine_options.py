"""Memory plans and speed options (QWEN_IMAGE_OFFLOAD/QUANTIZE/COMPILE/CACHE/LORA/ATTENTION/WARMUP)
on the tiny model: each really changes the pipeline, images stay close to the plain model's, and
every option that cannot work here stops the server at startup with one sentence saying why."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_image_server.engine import options as options_module
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.loader import load_model
from qwen_image_server.engine.memory import GiB, component_bytes, plan_offload
from qwen_image_server.engine.quantize import quantize_module, tensor_bytes
from qwen_image_server.engine.runner import PipelineEngine
from qwen_image_server.engine.types import GenerationSpec
from qwen_image_server.errors import ModelLoadError, OptionUnavailable
from tests.conftest import free_port, server_env, tiny_settings

SPEC = GenerationSpec(prompt="a red fox", negative_prompt=" ", width=256, height=256,
                      num_inference_steps=4, true_cfg_scale=4.0, seed=7)
CPU = DeviceInfo("cpu", None, None)
CUDA = DeviceInfo("cuda", "Some GPU", "12.8")


def generate(model: LoadedModel, spec: GenerationSpec = SPEC) -> np.ndarray:
    image = PipelineEngine(model).run_batch([spec], lambda event: None)[0]
    return np.asarray(image).astype(np.float64)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> LoadedModel:
    """The tiny model without options, loaded once for the tests that only read it."""
    return load_model(tiny_settings(tmp_path_factory.mktemp("plain")))


@pytest.fixture(scope="module")
def baseline(plain) -> np.ndarray:
    return generate(plain)


def make_lora(folder: Path, name: str, model: LoadedModel) -> Path:
    """A rank-4 LoRA on every attention query/key projection of the tiny transformer, in the
    diffusers/PEFT key format that Qwen-Image LoRAs on the hub use."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for module_name, module in model.pipeline.transformer.named_modules():
        if module_name.endswith(("attn.to_q", "attn.to_k")):
            weights[f"transformer.{module_name}.lora_A.weight"] = torch.randn(
                4, module.in_features, generator=generator) * 0.2
            weights[f"transformer.{module_name}.lora_B.weight"] = torch.randn(
                module.out_features, 4, generator=generator) * 0.2
    path = folder / name
    save_file(weights, path)
    return path


# -- the auto memory plan --------------------------------------------------------------------

SIZES = {"transformer": 40 * GiB, "text_encoder": 15 * GiB, "vae": GiB // 4}


@pytest.mark.parametrize(("free_gib", "expected"), [
    (78, "none"),        # an 80 GB card holds everything with room for activations
    (50, "model"),       # not everything, but the transformer alone
    (22, "sequential"),  # not even the transformer: layer by layer
])
def test_auto_offload_plan_compares_weights_with_free_gpu_memory(free_gib, expected):
    plan = plan_offload("auto", CUDA, SIZES, free_gib * GiB, headroom_bytes=6 * GiB)
    assert plan.plan == expected
    assert f"GPU free {free_gib:.1f} GiB" in plan.reason and "transformer 40.0 GiB" in plan.reason


def test_auto_offload_keeps_everything_in_place_without_a_gpu():
    assert plan_offload("auto", CPU, SIZES, None, 6 * GiB).plan == "none"
    assert plan_offload("model", CUDA, SIZES, 10 * GiB, 0).reason == "QWEN_IMAGE_OFFLOAD=model"


def test_size_estimate_for_the_plan_matches_the_quantized_weights(plain):
    transformer = copy.deepcopy(plain.pipeline.transformer)  # quantized in place below
    estimate = component_bytes(SimpleNamespace(components={"transformer": transformer}), "int8",
                               quantize_text_encoder=False)["transformer"]
    before = sum(tensor_bytes(p) for p in transformer.parameters())
    assert quantize_module(transformer, "int8", CPU) > 0
    after = sum(tensor_bytes(p) for p in transformer.parameters())
    assert after < 0.5 * before  # float32 -> int8 for every quantized layer
    assert abs(after - estimate) / after < 0.01


# -- each option on the tiny model -----------------------------------------------------------

def _is_quantized(model: LoadedModel) -> bool:
    return "torchao" in type(model.pipeline.transformer.transformer_blocks[0].attn.to_q.weight).__module__


def _img_mlp_quantized(model: LoadedModel) -> bool:
    weight = model.pipeline.transformer.transformer_blocks[0].img_mlp.net[0].proj.weight
    return "torchao" in type(weight).__module__


def _attention_backends(model: LoadedModel) -> set[object]:
    """The backend every attention processor of the transformer calls (diffusers sets it on each)."""
    backends = (getattr(module.processor, "_attention_backend", None)
                for module in model.pipeline.transformer.modules() if hasattr(module, "processor"))
    return {getattr(backend, "value", backend) for backend in backends}


def _step_cache_on(model: LoadedModel) -> bool:
    """cache-dit holds the pipeline's transformer blocks: its summary then carries the config."""
    import cache_dit

    return any(stats.cache_options for stats in cache_dit.summary(model.pipeline, details=False))


@pytest.mark.parametrize(("settings", "max_mean_diff", "applied"), [
    ({"quantize": "int8", "quantize_text_encoder": True}, 2.0,
     lambda m: _is_quantized(m) and not _img_mlp_quantized(m) and "torchao" in type(
         m.pipeline.text_encoder.model.language_model.layers[0].mlp.up_proj.weight).__module__),
    ({"quantize": "fp8", "quantize_skip": []}, 4.0, lambda m: _is_quantized(m) and _img_mlp_quantized(m)),
    ({"attention": "_native_math"}, 0.5, lambda m: _attention_backends(m) == {"_native_math"}),
    ({"cache": "cache-dit", "cache_options": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0,
                                              "max_warmup_steps": 1, "residual_diff_threshold": 0.5}},
     6.0, _step_cache_on),
], ids=["int8", "fp8", "attention", "cache-dit"])
def test_option_is_applied_and_the_image_stays_close(tmp_path, baseline, settings, max_mean_diff, applied):
    model = load_model(tiny_settings(tmp_path, **settings))
    assert applied(model)
    image = generate(model)
    assert image.shape == baseline.shape
    # Close to the plain model (levels 0-255): these options approximate, they do not repaint.
    assert np.abs(image - baseline).mean() < max_mean_diff


def test_cache_dit_skips_transformer_steps(tmp_path):
    import cache_dit

    model = load_model(tiny_settings(tmp_path, cache="cache-dit", cache_options={
        "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1,
        "residual_diff_threshold": 10.0}))  # a threshold nothing exceeds: every step may be cached
    generate(model, GenerationSpec("a fox", " ", 256, 256, 6, 4.0, 1))
    [stats, *_] = cache_dit.summary(model.pipeline, details=False) or [None]
    assert stats is not None and len(stats.cached_steps) >= 3


@pytest.mark.slow
def test_regional_compile_with_warm_up_gives_the_same_image(tmp_path, baseline):
    # One image per batch: warming up every batch size is tests/test_gpu_paths.py's subject.
    model = load_model(tiny_settings(tmp_path, compile=True, max_batch_size=1))
    assert model.options.warmup  # compile always warms up, so no request pays for tracing
    blocks = model.pipeline.transformer.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    engine = PipelineEngine(model)
    assert engine.warm_up(["s1:1"]) > 0
    image = np.asarray(engine.run_batch([SPEC], lambda event: None)[0]).astype(np.float64)
    assert np.abs(image - baseline).max() <= 2.0  # same math, fused kernels: rounding only


def test_lora_is_fused_at_its_scale(tmp_path, plain, baseline):
    lora = make_lora(tmp_path, "style.safetensors", plain)
    unchanged = generate(load_model(tiny_settings(tmp_path, lora=f"{lora},0")))
    assert np.array_equal(unchanged, baseline)  # scale 0 adds nothing
    fused = load_model(tiny_settings(tmp_path, lora=f"{lora},1.5"))
    assert fused.options.lora == str(lora) and fused.options.lora_scale == 1.5
    # Fused, not attached: the transformer holds plain layers again (no per-step adapter cost),
    # whose weights are W + scale * (B @ A).
    assert not any("lora" in name for name, _ in fused.pipeline.transformer.named_parameters())
    plain_weight = plain.pipeline.transformer.transformer_blocks[0].attn.to_q.weight
    adapter = load_file(lora)
    delta = (adapter["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
             @ adapter["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    fused_weight = fused.pipeline.transformer.transformer_blocks[0].attn.to_q.weight
    torch.testing.assert_close(fused_weight, plain_weight + 1.5 * delta)
    assert not np.array_equal(generate(fused), baseline)


# -- through the server ----------------------------------------------------------------------

def test_server_reports_options_and_a_lightning_lora_sets_the_defaults(server, tmp_path, plain):
    lora = make_lora(tmp_path, "tiny-Lightning-4steps.safetensors", plain)
    live = server(quantize="int8", attention="_native_math", lora=str(lora), warmup=True,
                  warmup_aspect_ratios=["s1:1"])
    with live.client() as client:
        info = client.get("/info").json()
        assert info["options"] | {"offload_reason": "..."} == {
            "offload": "none", "offload_reason": "...", "quantize": "int8", "quantize_text_encoder": False,
            "quantize_skip": ["img_mlp"],
            "compile": False, "cache": "none", "cache_options": {}, "lora": str(lora), "lora_scale": 1.0,
            "attention": "_native_math", "warmup": True, "fp8_fallbacks": {}}
        assert info["defaults"] == {"num_inference_steps": 4, "true_cfg_scale": 1.0,
                                    "reason": "the 4-step Lightning LoRA's card"}
        assert info["scheduler"]["processed"] == 0  # the warm-up is not a user request
        job = client.post("/v1/jobs", json={"prompt": "a fox", "add_overlay": False}).json()
        assert job["progress"]["total"] == 4  # the LoRA's step count, not the API's 20
        explicit = client.post("/v1/jobs", json={"prompt": "a fox", "num_inference_steps": 3}).json()
        assert explicit["progress"]["total"] == 3  # a client's own value always wins
        reply = client.post("/generate", json={"prompt": "a fox", "add_overlay": False})
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"


def test_an_option_that_cannot_work_stops_the_server_with_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path,
                          env=server_env(free_port(), QWEN_IMAGE_ATTENTION="flash"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "Could not start with these options" in done.stderr
    assert "QWEN_IMAGE_ATTENTION=flash runs on NVIDIA GPUs only" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("lora", "problem"), [
    ("./missing-lora.safetensors", "no such file or folder: {tmp}/missing-lora.safetensors; give a .safetensors "
                                   "file, a folder holding one, or a hub id (owner/name:file.safetensors)."),
    ("owner/repo:file.safetensors,strong", "the LoRA scale 'strong' is not a number."),
], ids=["missing-file", "bad-scale"])
def test_a_lora_that_is_not_there_stops_serve_at_once_with_one_line(tmp_path, lora, problem):
    # Found before torch is imported: no engine starts.
    done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path,
                          env=server_env(free_port(), QWEN_IMAGE_LORA=lora),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    expected = f"error: QWEN_IMAGE_LORA={lora!r}: {problem.format(tmp=tmp_path)}"
    assert done.stderr.splitlines() == [expected], done.stderr


@pytest.mark.parametrize(("settings", "message"), [
    ({"attention": "flash"}, "QWEN_IMAGE_ATTENTION=flash runs on NVIDIA GPUs only"),
    ({"offload": "sequential"}, "QWEN_IMAGE_OFFLOAD=sequential moves weights between CPU and a GPU"),
    ({"cache": "cache-dit", "cache_options": {"Fn_blocks": 2}}, "Fn_blocks"),
    ({"cache": "cache-dit", "cache_options": {"Fn_compute_blocks": 8}}, "must not exceed the transformer's 2 blocks"),
    ({"lora": "./missing-lora.safetensors"}, "no such file or folder: missing-lora.safetensors"),
], ids=["attention", "offload", "cache-knob", "cache-blocks", "missing-lora"])
def test_the_loader_refuses_an_option_that_cannot_work(tmp_path, settings, message):
    # The same message the server prints before exiting (shown end to end just above).
    with pytest.raises(ModelLoadError, match="Could not start with these options") as refused:
        load_model(tiny_settings(tmp_path, **settings))
    assert message in str(refused.value)


@pytest.mark.parametrize(("settings", "extra"), [
    ({"quantize": "int8"}, "qwen-image-server[gpu]"),
    ({"cache": "cache-dit"}, "qwen-image-server[cache]"),
])
def test_a_missing_package_names_the_extra_to_install(monkeypatch, tmp_path, settings, extra):
    monkeypatch.setattr(options_module, "_missing", lambda module: True)
    with pytest.raises(OptionUnavailable) as refused:
        options_module.check_options(tiny_settings(tmp_path, **settings), CPU)
    assert f"pip install '{extra}'" in str(refused.value)


def test_combinations_that_cannot_work_are_refused_before_loading(tmp_path):
    with pytest.raises(OptionUnavailable, match="QWEN_IMAGE_COMPILE=1 cannot compile blocks"):
        options_module.check_options(tiny_settings(tmp_path, offload="sequential", compile=True), CUDA)
    with pytest.raises(OptionUnavailable, match="QUANTIZE_TEXT_ENCODER=1 needs QWEN_IMAGE_QUANTIZE"):
        options_module.check_options(tiny_settings(tmp_path, quantize_text_encoder=True), CPU)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="model and sequential offload move weights between the CPU and a CUDA GPU; "
                           "bench/gpu.py measures them on one")
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_gives_the_same_image_on_a_gpu(tmp_path, offload):
    on_gpu = generate(load_model(tiny_settings(tmp_path, offload="none")))
    offloaded = load_model(tiny_settings(tmp_path, offload=offload))
    assert offloaded.options.offload == offload
    assert np.abs(generate(offloaded) - on_gpu).max() <= 2.0


def test_bad_json_in_cache_options_is_a_settings_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "qwen_image_server", "serve"], cwd=tmp_path,
                          env=server_env(free_port(), QWEN_IMAGE_CACHE_OPTIONS="{not json"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "cache_options" in done.stderr.lower()
