"""GPU code paths proved on the CPU with the tiny model: offload with step caching, attention
masks in batches, plans `auto` resolves to, quantizing through the GPU, out-of-memory retries,
interrupted offloaded calls, cache-dit without CFG, compile warm-up, fp8 and cuBLAS errors.

Where a path needs a GPU's facts, the test supplies them: a device that calls itself CUDA but
computes on the CPU (`CpuAsCuda`), and monkeypatched `torch.cuda` numbers (free memory,
compute capability).
"""

from __future__ import annotations

import dataclasses
import random
import weakref

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from qwen_image_server import errors
from qwen_image_server.config.presets import ASPECT_RATIOS
from qwen_image_server.engine import compilation
from qwen_image_server.engine import options as options_module
from qwen_image_server.engine import quantize as quantize_module_
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.loader import load_model
from qwen_image_server.engine.memory import GiB, component_bytes
from qwen_image_server.engine.options import (
    check_options,
    prepare_pipeline,
    takes_padding_mask,
)
from qwen_image_server.engine.quantize import (
    TEXT_ENCODER_SKIP,
    Fp8Chooser,
    Fp8Kind,
    fp8_kinds,
    probe_fp8,
    quantize_module,
    tensor_bytes,
)
from qwen_image_server.engine.runner import PipelineEngine, inference_context
from qwen_image_server.engine.tiny import ensure_tiny_model
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    EditSpec,
    GenerationSpec,
    PreviewPlan,
    StepEvent,
)
from qwen_image_server.errors import OptionUnavailable
from qwen_image_server.scheduler import Scheduler, SchedulerConfig
from tests.conftest import tiny_settings


@dataclasses.dataclass(frozen=True, slots=True)
class CpuAsCuda(DeviceInfo):
    """A CUDA device as the server's code sees it, whose tensors stay on the CPU."""

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")


GPU = CpuAsCuda("cuda", "Fake 24GB", "12.8")
CPU = DeviceInfo("cpu", None, None)


def spec(prompt: str = "a red fox", *, size: int = 64, steps: int = 2, cfg: float = 4.0,
         seed: int = 7) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, negative_prompt=" ", width=size, height=size,
                          num_inference_steps=steps, true_cfg_scale=cfg, seed=seed)


def no_progress(event: StepEvent) -> None:
    return None


@pytest.fixture
def gpu_facts(monkeypatch):
    """torch.cuda's answers for a 24 GB Ada card, set per test: free memory and capability."""
    facts = {"free": 22 * GiB, "capability": (8, 9)}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (facts["free"], 24 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: facts["capability"])
    return facts


def tiny_pipeline(cache_dir) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(ensure_tiny_model(cache_dir), dtype=torch.float32)


def engine_on(pipeline: QwenImagePipeline, settings, device: DeviceInfo) -> PipelineEngine:
    """Apply the options as the loader does, on `device`, and wrap the result like the server."""
    options = prepare_pipeline(pipeline, settings, device)
    model = LoadedModel(pipeline=pipeline, name="tiny", source="embedded", device=device,
                        dtype=torch.float32, load_time=0.0, total_parameters=0, size_mb=0.0,
                        options=options, max_batch_size=settings.max_batch_size or 1)
    return PipelineEngine(model)


# -- 1 and 6: cache-dit under model offload, with and without CFG --------------------------------

CACHE_EVERYTHING = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 2,
                    "residual_diff_threshold": 10.0}  # nothing exceeds it: every step may be cached


def cached_steps(pipeline) -> tuple[list[int], list[int]]:
    import cache_dit

    [stats, *_] = cache_dit.summary(pipeline, logging=False)
    return list(stats.cached_steps), list(stats.cfg_cached_steps)


@pytest.fixture(scope="module")
def offloaded_cached(tmp_path_factory) -> PipelineEngine:
    """Model offload (what `auto` picks for bf16 on a 48 GB card) with cache-dit on."""
    folder = tmp_path_factory.mktemp("offload")
    settings = tiny_settings(folder, offload="model", cache="cache-dit", cache_options=CACHE_EVERYTHING)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * GiB, 48 * GiB))
        return engine_on(tiny_pipeline(settings.cache_dir), settings, GPU)


def test_cache_dit_keeps_caching_every_call_under_model_offload(offloaded_cached):
    assert offloaded_cached.model.options.offload == "model"
    for call in range(3):  # model offload re-installs its hooks after every call
        offloaded_cached.run_batch([spec(steps=6, seed=call)], no_progress)
        steps, cfg_steps = cached_steps(offloaded_cached.pipeline)
        assert steps == [2, 3, 4, 5] and cfg_steps == [2, 3, 4, 5], (call, steps, cfg_steps)


def test_cache_dit_counts_steps_of_a_call_without_cfg(offloaded_cached):
    # A Lightning request: 8 steps, one transformer pass each. Counted as CFG pairs, cache-dit saw
    # 4 steps and cached 2 of them.
    offloaded_cached.run_batch([spec(steps=8, cfg=1.0)], no_progress)
    assert cached_steps(offloaded_cached.pipeline) == ([2, 3, 4, 5, 6, 7], [])
    offloaded_cached.run_batch([spec(steps=8, cfg=4.0)], no_progress)  # and back
    assert cached_steps(offloaded_cached.pipeline) == ([2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7])


def test_previews_under_model_offload_and_cache_dit_leave_the_image_unchanged(offloaded_cached):
    # A full preview decodes with the VAE between two transformer steps: under model offload its
    # hook moves the VAE in and the transformer out, and the next step brings the transformer back.
    plain = offloaded_cached.run_batch([spec(steps=4, seed=9)], no_progress)[0]
    events: list[StepEvent] = []
    for mode in ("full", "latent"):
        events.clear()
        previewing = dataclasses.replace(spec(steps=4, seed=9), preview=PreviewPlan(mode, every=2))
        image = offloaded_cached.run_batch([previewing], events.append)[0]
        assert image.tobytes() == plain.tobytes(), mode
        assert [(e.step, e.previews[0].mode) for e in events if e.previews] == [(2, mode), (4, mode)]
    assert cached_steps(offloaded_cached.pipeline)[0] == [2, 3]  # cache-dit still caches as before


# -- 5: an interrupted call under model offload offloads what it left on the GPU ----------------

@pytest.mark.parametrize("interruption", ["cancel", "error"])
def test_an_interrupted_call_under_model_offload_puts_the_components_back(offloaded_cached, monkeypatch,
                                                                          interruption):
    pipeline = offloaded_cached.pipeline
    offloads = []
    original = pipeline.maybe_free_model_hooks
    monkeypatch.setattr(pipeline, "maybe_free_model_hooks", lambda: (offloads.append(1), original())[1])

    def stop(event: StepEvent) -> None:
        raise BatchAborted if interruption == "cancel" else RuntimeError("something broke")

    with pytest.raises(BatchAborted if interruption == "cancel" else RuntimeError):
        offloaded_cached.run_batch([spec(steps=4)], stop)
    # Diffusers offloads at the end of a call it completes; this call never got there.
    assert offloads == [1]
    offloaded_cached.run_batch([spec(steps=2)], no_progress)
    assert offloads == [1, 1]  # a completed call offloads once, by itself


# -- 2: attention backends without padding masks and batches ------------------------------------

def test_backends_that_cannot_apply_a_padding_mask_are_known_from_diffusers():
    for name in ("flash", "_flash_3", "_flash_3_hub", "sage", "_native_flash",  # raise on any mask
                 "flash_varlen", "_flash_varlen_3", "sage_varlen"):  # keep the first N keys only
        assert not takes_padding_mask(name), name
    for name in ("native", "_native_math", "_native_cudnn", "_native_efficient", "flex", "xformers"):
        assert takes_padding_mask(name), name


def test_a_backend_without_masks_batches_prompts_of_one_length_per_call(tmp_path, monkeypatch):
    model = load_model(tiny_settings(tmp_path, attention="_native_flash", max_batch_size=4))
    engine = PipelineEngine(model)
    short, same_length = spec("a cat", seed=1), spec("a cow", seed=3)
    # The long prompt's image also asks for previews: they reach it in its own call.
    long = dataclasses.replace(spec("a dog running on a beach at dusk", seed=2),
                               preview=PreviewPlan("latent", every=1))
    # Prompts of different lengths in one call need a padding mask, which this backend refuses.
    with pytest.raises(ValueError, match="attn_mask"):
        engine._call([short, long], no_progress)
    alone = [np.asarray(engine.run_batch([s], no_progress)[0]).astype(np.float64) for s in (short, long, same_length)]

    calls, progress, previews = [], [], []
    original = engine._call
    monkeypatch.setattr(engine, "_call", lambda specs, on_step: (calls.append(len(specs)), original(specs, on_step))[1])

    def on_step(event: StepEvent) -> None:
        progress.append((event.step, event.total))
        previews.extend((index, preview.step, preview.total) for index, preview in event.previews.items())

    images = engine.run_batch([short, long, same_length], on_step)
    assert calls == [2, 1]  # the two short prompts together, then the long one
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one run of 2 steps x 2 calls, as a client sees it
    assert previews == [(1, 1, 2), (1, 2, 2)]  # the long prompt's (index 1), at its own steps
    for image, reference in zip(images, alone, strict=True):  # each image where its request is
        assert np.abs(np.asarray(image).astype(np.float64) - reference).max() <= 2.0

    calls.clear()
    engine.run_batch([short, same_length, spec("a pig", seed=4)], no_progress)
    assert calls == [3]  # one length: one call, as with any backend


def test_a_backend_with_masks_runs_any_batch_in_one_call(tmp_path):
    engine = PipelineEngine(load_model(tiny_settings(tmp_path, attention="_native_math", max_batch_size=4)))
    assert not engine.equal_lengths_only
    assert len(engine.run_batch([spec("a cat"), spec("a dog running on a beach at dusk")], no_progress)) == 2


# -- 3: the plan auto resolves to is checked; quantizing follows the plan -----------------------

def test_auto_resolving_to_sequential_offload_refuses_compile_at_startup(tmp_path, gpu_facts):
    gpu_facts["free"] = 1024  # not even the tiny transformer fits: auto picks sequential
    settings = tiny_settings(tmp_path, compile=True)
    with pytest.raises(OptionUnavailable, match="plan is sequential") as refused:
        prepare_pipeline(tiny_pipeline(settings.cache_dir), settings, GPU)
    assert "alone does not fit" in str(refused.value)  # the reason auto gave


class MoveSpy:
    """Records every Module.to(device) call: which module went where."""

    def __init__(self, monkeypatch) -> None:
        self.moves: list[tuple[torch.nn.Module, torch.device]] = []
        original = torch.nn.Module.to

        def to(module, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if isinstance(device, (str, torch.device)):
                self.moves.append((module, torch.device(device)))
            return original(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)


@pytest.mark.parametrize("plan", ["none", "model"])
def test_quantizing_moves_one_layer_at_a_time_and_back_under_offload(tmp_path, gpu_facts, monkeypatch, plan):
    settings = tiny_settings(tmp_path, quantize="int8", quantize_text_encoder=True, offload_headroom_gb=0)
    pipeline = tiny_pipeline(settings.cache_dir)
    sizes = component_bytes(pipeline, "int8", True)
    # Room for everything, or for the largest component alone: auto picks none, or model offload.
    gpu_facts["free"] = sum(sizes.values()) if plan == "none" else max(sizes.values())
    monkeypatch.setattr(options_module, "place", lambda *args: None)  # placing is not what is watched
    spy = MoveSpy(monkeypatch)
    options = prepare_pipeline(pipeline, settings, GPU)
    assert options.offload == plan
    # Only single layers moved: quantize_(device=...) would move the whole transformer, and the
    # text encoder after it, onto the GPU.
    assert spy.moves and all(isinstance(module, torch.nn.Linear) for module, _ in spy.moves)
    layers = [module for module, _ in spy.moves]
    if plan == "none":
        assert len(layers) == len(set(layers))  # each to the GPU once, and it stays there
    else:
        assert layers[0::2] == layers[1::2]  # each to the GPU and straight back, one at a time
    visual = {m for name, m in pipeline.text_encoder.named_modules() if "visual." in name}
    assert not visual & set(layers)  # the vision tower is never used for text-to-image


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_layers_run_under_sequential_offload(tmp_path, mode):
    """Sequential offload moves each layer's weights in and out per call. torchao's tensors come
    through it in the autograd mode the engine uses for that plan (not in inference mode), so
    quantization and sequential offload may be combined: the 24 GB plan for fp8."""
    import accelerate

    transformer = QwenImageTransformer2DModel.from_pretrained(
        ensure_tiny_model(tiny_settings(tmp_path).cache_dir) / "transformer", dtype=torch.bfloat16).eval()
    quantize_module(transformer, mode, CPU, ())
    config = transformer.config
    inputs = dict(hidden_states=torch.randn(1, 16, config.in_channels, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim, dtype=torch.bfloat16),
                  timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]])
    with torch.inference_mode():
        resident = transformer(**inputs).sample
    # What enable_sequential_cpu_offload does to each component.
    accelerate.cpu_offload(transformer, execution_device=torch.device("cpu"), offload_buffers=True)
    assert transformer.transformer_blocks[0].attn.to_q.weight.device.type == "meta"  # really offloaded
    with pytest.raises(NotImplementedError, match="aten.to"), torch.inference_mode():
        transformer(**inputs)
    options = type("Options", (), {"offload": "sequential", "quantize": mode})()
    with inference_context(options):
        offloaded = transformer(**inputs).sample
    torch.testing.assert_close(offloaded, resident)


def test_quantization_no_longer_refuses_sequential_offload(tmp_path):
    assert check_options(tiny_settings(tmp_path, offload="sequential", quantize="int8"), GPU) is None


# -- 8 and 9: fp8 dtype and what fp8 really quantizes -------------------------------------------

def test_fp8_with_float16_weights_is_refused_before_the_download(tmp_path, gpu_facts):
    with pytest.raises(OptionUnavailable, match="QWEN_IMAGE_DTYPE=bfloat16") as refused:
        check_options(tiny_settings(tmp_path, quantize="fp8", dtype="float16"), GPU)
    assert "is float16" in str(refused.value)
    assert check_options(tiny_settings(tmp_path, quantize="fp8", dtype="bfloat16"), GPU) is None
    assert check_options(tiny_settings(tmp_path, quantize="fp8"), GPU) is None  # auto is bf16 on CUDA


def test_an_fp8_probe_passes_a_kind_that_runs_and_says_why_one_fails():
    from torchao.quantization import Float8WeightOnlyConfig

    assert probe_fp8(Fp8Kind("weight-only", Float8WeightOnlyConfig()), (64, 32, True), CPU) is None
    # Dynamic fp8 needs an fp8-capable GPU: on the CPU quantizing the scratch layer fails.
    assert "CUDA" in probe_fp8(fp8_kinds()[0], (64, 32, True), CPU)


def test_running_out_of_memory_while_probing_is_not_taken_for_a_missing_kernel(monkeypatch):
    import torchao.quantization

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 150.00 MiB")

    monkeypatch.setattr(torchao.quantization, "quantize_", full)
    with pytest.raises(torch.OutOfMemoryError):
        probe_fp8(fp8_kinds()[0], (64, 32, True), CPU)


def test_fp8_layer_shapes_without_a_row_wise_kernel_take_the_next_kind_that_runs(tmp_path, gpu_facts, monkeypatch):
    """cuBLASLt has no row-wise fp8 kernel for large-K layers at prompt-length row counts
    (pytorch/ao#4582: every request failed at the text stream's MLP on an H200). Each layer
    shape is tried once; those shapes take the next kind, the others stay row-wise, and the
    model still generates. Kinds that run on the CPU stand in for the GPU's, told apart by the
    tensor type they leave: row-wise -> fp8, per-tensor -> int8."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    monkeypatch.setattr(quantize_module_, "fp8_kinds", lambda: [
        Fp8Kind("row-wise", Float8WeightOnlyConfig()), Fp8Kind("per-tensor", Int8WeightOnlyConfig())])
    probed: list[tuple[str, tuple[int, int, bool]]] = []

    def probe(kind, shape, device):
        probed.append((kind.name, shape))
        large_k = shape[0] > shape[1]  # the MLPs' down projections
        return "CUBLAS_STATUS_NOT_SUPPORTED" if large_k and kind.name == "row-wise" else None

    monkeypatch.setattr(quantize_module_, "probe_fp8", probe)
    monkeypatch.setattr(options_module, "place", lambda *args: None)
    settings = tiny_settings(tmp_path, quantize="fp8", quantize_text_encoder=True, offload="none")
    pipeline = QwenImagePipeline.from_pretrained(ensure_tiny_model(settings.cache_dir), dtype=torch.bfloat16)
    options = prepare_pipeline(pipeline, settings, GPU)

    assert len(probed) == len(set(probed))  # one try per shape and kind, the text encoder's too
    down = pipeline.transformer.transformer_blocks[0].txt_mlp.net[2]
    up = pipeline.transformer.transformer_blocks[0].txt_mlp.net[0].proj
    assert "Int8" in type(down.weight).__name__ and "Float8" in type(up.weight).__name__
    large_k = {f"{i}x{o}" for _, (i, o, _) in probed if i > o}
    assert large_k and options.fp8_fallbacks == dict.fromkeys(large_k, "per-tensor")
    assert "fp8 fallbacks" in options.summary()
    image = PipelineEngine(LoadedModel(pipeline=pipeline, name="tiny", source="test", device=CPU,
                                       dtype=torch.bfloat16, load_time=0, total_parameters=0, size_mb=0,
                                       options=options)).run_batch([spec()], no_progress)[0]
    assert np.asarray(image).std() > 0


def test_an_fp8_layer_shape_no_kind_runs_stays_in_bf16():
    layers = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 32), "b": torch.nn.Linear(32, 32)}).to(torch.bfloat16)
    from torchao.quantization import Float8WeightOnlyConfig

    chooser = Fp8Chooser(GPU, kinds=[Fp8Kind("row-wise", Float8WeightOnlyConfig())],
                         probe=lambda kind, shape, device: "not supported" if shape[0] == 64 else None)
    assert quantize_module(layers, "fp8", GPU, (), chooser=chooser) == 1
    assert layers["a"].weight.dtype == torch.bfloat16 and type(layers["a"].weight) is torch.nn.Parameter
    assert "Float8" in type(layers["b"].weight).__name__
    assert chooser.fallbacks() == {"64x32": "bf16"}


class FakePipeline:
    """`components`, as component_bytes reads them, with layers fp8 cannot take."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        bf16 = torch.bfloat16
        self.transformer = torch.nn.ModuleDict({
            "attn": torch.nn.Linear(64, 64).to(bf16),
            "odd": torch.nn.Linear(64, 40).to(bf16),  # 40 rows: not a multiple of 16
            "img_mlp": torch.nn.Linear(64, 64).to(bf16),
        })
        self.text_encoder = torch.nn.ModuleDict({
            "language_model": torch.nn.Linear(64, 128).to(bf16),
            "visual": torch.nn.ModuleDict({"mlp": torch.nn.Linear(48, 48).to(bf16)}),  # the unused vision tower
        })
        self.components = {"transformer": self.transformer, "text_encoder": self.text_encoder,
                           "tokenizer": object()}


def test_fp8_size_estimate_counts_what_fp8_really_quantizes():
    pipeline = FakePipeline()
    estimate = component_bytes(pipeline, "fp8", quantize_text_encoder=True)
    assert quantize_module(pipeline.transformer, "fp8", CPU) == 1  # attn; odd and img_mlp stay bf16
    assert quantize_module(pipeline.text_encoder, "fp8", CPU, TEXT_ENCODER_SKIP) == 1
    for name in ("transformer", "text_encoder"):
        real = sum(tensor_bytes(p) for p in pipeline.components[name].parameters())
        assert estimate[name] == real, name
    assert "torchao" not in type(pipeline.transformer["odd"].weight).__module__
    assert "torchao" not in type(pipeline.text_encoder["visual"]["mlp"].weight).__module__


# -- 4: the OOM retry frees the failed batch's memory first -------------------------------------

class StandInEncoder:
    """What the engine's prompt cache asks of a pipeline: its text encoder (no LoRA on it) and
    one prompt's embeddings."""

    text_encoder = None
    _execution_device = "cpu"

    def _get_qwen_prompt_embeds(self, prompts, device):
        return torch.zeros(len(prompts), 3, 8), torch.ones(len(prompts), 3, dtype=torch.long)


class AllocatingPipeline(StandInEncoder):
    """A pipeline whose calls hold activations (a tensor in the call's frame) and run out of
    memory for batches over one image: what the real engine's error path and the scheduler's
    retry get from a device that is full."""

    def __init__(self) -> None:
        self.scheduler = type("Scheduler", (), {"config": {}})()
        self.activations: list[weakref.ref] = []  # each call's tensor
        self.earlier_alive: list[bool] = []  # at each call: whether an earlier call's tensor lived on
        self.batches: list[int] = []

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, prompt_embeds, width, height, **kwargs):
        from PIL import Image

        prompt = list(prompt_embeds)  # one row per image
        self.earlier_alive.append(any(ref() is not None for ref in self.activations))
        self.batches.append(len(prompt))
        activations = torch.empty(1_000_000)  # the call's device tensors
        self.activations.append(weakref.ref(activations))
        if len(prompt) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return type("Output", (), {"images": [Image.new("RGB", (width, height)) for _ in prompt]})()


def test_out_of_memory_retry_frees_the_failed_batch_before_retrying():
    pipeline = AllocatingPipeline()
    engine = pipeline_engine(pipeline)  # the real engine's error mapping and free_memory
    scheduler = Scheduler(lambda: engine, SchedulerConfig(max_batch_size=2))
    scheduler.start()
    try:
        jobs = scheduler.submit_many([spec(seed=1), spec(seed=2)], request_id=1)
        for job in jobs:
            assert job.future.result(timeout=30).batch_size == 1
    finally:
        scheduler.stop()
        scheduler.join(5)
    assert pipeline.batches == [2, 1, 1]
    # The failed call's tensors were gone when each retry started: the retry had the memory.
    assert pipeline.earlier_alive == [False, False, False]


# -- 10: cuBLAS errors that are not fatal -------------------------------------------------------

class RaisingPipeline(StandInEncoder):
    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.scheduler = type("Scheduler", (), {"config": {}})()

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, **kwargs):
        raise self.error


def pipeline_engine(pipeline: object) -> PipelineEngine:
    """The real PipelineEngine over a stand-in pipeline, as a GPU model."""
    model = type("Model", (), {"pipeline": pipeline, "max_prompt_tokens": 1024,
                               "device": GPU, "task": "generate", "controlnet": None, "inpaint_controlnet": None,
                               "options": type("Options", (), {"cache": "none", "offload": "none",
                                                               "attention": "native"})()})()
    return PipelineEngine(model)  # type: ignore[arg-type]


def raising_engine(error: BaseException) -> PipelineEngine:
    return pipeline_engine(RaisingPipeline(error))


@pytest.mark.parametrize(("message", "becomes"), [
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", DeviceOutOfMemory),
    ("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul( ... )`", RuntimeError),
    ("CUDA error: an illegal memory access was encountered", DeviceFailure),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( ... )`", DeviceFailure),
], ids=["alloc-failed-is-oom", "not-supported-fails-the-batch", "illegal-access-is-fatal", "execution-failed-is-fatal"])
def test_cublas_errors_are_sorted_by_what_recovers_them(message, becomes):
    with pytest.raises(becomes) as raised:
        raising_engine(RuntimeError(message)).run_batch([spec()], no_progress)
    assert type(raised.value) is becomes


def test_an_unsupported_fp8_matmul_fails_its_batch_and_the_server_keeps_serving():
    engine = raising_engine(RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul`"))
    scheduler = Scheduler(lambda: engine, SchedulerConfig(max_batch_size=1))
    scheduler.start()
    try:
        job = scheduler.submit(spec(), request_id=1)
        with pytest.raises(errors.InferenceFailed):
            job.future.result(timeout=30)
        assert not scheduler.dead and scheduler.ready
    finally:
        scheduler.stop()
        scheduler.join(5)


# -- 7: compile warm-up covers every batch the server forms -------------------------------------

@pytest.mark.slow
def test_compile_warm_up_leaves_nothing_to_compile_for_live_batches(tmp_path, monkeypatch):
    # The backend is dynamo's "eager": what gets recompiled is decided by dynamo's guards, the
    # same whatever the backend, and it spares the CPU inductor's code generation.
    original = QwenImageTransformer2DModel.compile_repeated_blocks
    monkeypatch.setattr(QwenImageTransformer2DModel, "compile_repeated_blocks",
                        lambda self, **kw: original(self, backend="eager", **kw))
    monkeypatch.setitem(ASPECT_RATIOS, "s1:1", (64, 64))  # the preset's shape, at a CPU test's size
    torch.compiler.reset()
    model = load_model(tiny_settings(tmp_path, compile=True, max_batch_size=3, max_batch_pixels=3 * 64 * 64))
    engine = PipelineEngine(model)
    engine.warm_up(["s1:1"], steps=1)  # as the server does before /ready turns 200
    warmed = compilation.compiled_graphs()
    assert warmed > 0

    words = ["cat", "dog", "sun", "red", "blue", "house", "tree", "car", "sky", "on", "in", "with", "a", "the"]
    rng = random.Random(0)
    for batch in (1, 2, 3, 2):
        prompts = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(batch)]
        for specs in ([spec(p, size=64, steps=1) for p in prompts],  # mixed lengths: a padding mask
                      [spec(prompts[0], size=64, steps=1)] * batch,  # equal lengths: none
                      [spec(p, size=64, steps=1, cfg=1.0) for p in prompts]):  # no CFG
            engine.run_batch(specs, no_progress)
    assert compilation.compiled_graphs() == warmed  # live traffic compiled nothing


def test_images_from_quantized_offloaded_model_stay_close(tmp_path, gpu_facts):
    """A 48 GB card's path: quantized text encoder and transformer under model offload."""
    settings = tiny_settings(tmp_path)
    plain = engine_on(tiny_pipeline(settings.cache_dir), settings, CPU)
    baseline = np.asarray(plain.run_batch([spec(size=128)], no_progress)[0]).astype(np.float64)
    offloaded = engine_on(tiny_pipeline(settings.cache_dir),
                          tiny_settings(tmp_path, quantize="int8", quantize_text_encoder=True, offload="model"), GPU)
    image = np.asarray(offloaded.run_batch([spec(size=128)], no_progress)[0]).astype(np.float64)
    assert np.abs(image - baseline).mean() < 2.0


def test_a_masked_edit_leaves_a_bfloat16_edit_model_in_bfloat16(tmp_path, small_working_size):
    """A masked edit runs a second pipeline over the edit model's modules. Making it must not
    cast them: a float32 cast doubles a GPU model's memory and makes every later step of that
    model run in float32."""
    from PIL import Image

    from qwen_image_server.config.model_list import TINY_EDIT_MODEL_NAME, ModelRef

    model = load_model(tiny_settings(tmp_path, dtype="bfloat16"),
                       ModelRef(TINY_EDIT_MODEL_NAME, TINY_EDIT_MODEL_NAME))
    pipeline = model.pipeline

    def weights() -> dict[str, tuple[set[torch.dtype], int]]:
        return {name: ({p.dtype for p in part.parameters()},
                       sum(p.numel() * p.element_size() for p in part.parameters()))
                for name, part in pipeline.components.items() if isinstance(part, torch.nn.Module)}

    before = weights()
    assert before["transformer"][0] == {torch.bfloat16}
    picture = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    spec = EditSpec("p", " ", 64, 64, 2, 4.0, 1, model=TINY_EDIT_MODEL_NAME, images=(picture,), mask=mask,
                    inputs_digest="masked")
    images = PipelineEngine(model).run_batch([spec], lambda event: None)
    assert len(images) == 1
    assert weights() == before
