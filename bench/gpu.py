#!/usr/bin/env python3
"""Full-size Qwen-Image benchmark via the server's engine: speed options, batching, memory, HTTP.

On a CUDA GPU it builds the real architecture (20.4B transformer, 8.3B Qwen2.5-VL-7B text
encoder, 127M VAE) with random bf16 weights directly on the GPU: no download, no disk. Speed and
memory do not depend on weight values, so the numbers are those of the real model, with two
exceptions said in the table: cache-dit decides which steps to skip from the model's outputs, so
its hit rate with random weights is not the real one; and a Lightning LoRA is emulated by its
step count and CFG (a fused LoRA costs nothing per step). Every configuration goes through
`engine.options.prepare_pipeline`, `LoadedModel` and `PipelineEngine.run_batch`, as in the server.

Without a GPU (or with --smoke) it runs the embedded tiny model on the CPU, so CI can check it.

    .venv/bin/python bench/gpu.py                        # CUDA: the full matrix; no new work after 420 s
    .venv/bin/python bench/gpu.py --append               # continue a run the time budget cut short
    .venv/bin/python bench/gpu.py --configs baseline,compile+fp8 --sizes 1024x1024 --measure-steps 50
    .venv/bin/python bench/gpu.py --smoke                # CPU, tiny models, about half a minute
    .venv/bin/python bench/gpu.py --plan speed-table     # the speed table and its goals (docs/benchmarks.md)

Sections: speed (per-step and end-to-end time per configuration and size), batch (throughput
of batches on the first configuration), memory (peak GPU memory of offload and quantization
plans, and whether each fits 24 / 48 / 80 GB cards), http (one request through the real app vs
the raw engine call), edit (Qwen-Image-Edit-2509 / -2511 on the first configuration: the same
random components in a QwenImageEditPlusPipeline, one and three input images, 1024x1024, 40 and
50 steps; with --smoke the embedded tiny edit model). It prints one markdown table and writes
the rows as JSON. preview (on the first configuration, 1024x1024): what a latent and a full preview
at every step cost, each against a step. attention (on the first configuration): every diffusers
attention backend of --attention-backends, or a row saying why it cannot run here.

--plan speed-table runs the rows of docs/benchmarks.md's "The GPU speed table" (1024x1024, cfg 4,
50 steps: baseline, compile, fp8, compile+fp8, compile+fp8+cache; the attention backends; the
server against the raw engine with the prompt cache), prints that table with the goals met or
missed and the two-GPU estimates, and writes it as Markdown beside the JSON. Every run prints the
two-GPU estimate (CFG-parallel, Ulysses) from the measured step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import itertools
import json
import logging
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_image_server.config.model_list import (
    TINY_EDIT_MODEL_NAME,
    ModelRef,
)
from qwen_image_server.config.presets import ASPECT_RATIOS, with_suffix
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.compilation import compiled_graphs
from qwen_image_server.engine.device import DeviceInfo, resolve_device, resolve_dtype
from qwen_image_server.engine.loaded import LoadedModel
from qwen_image_server.engine.loader import count_parameters, load_model
from qwen_image_server.engine.runner import PipelineEngine
from qwen_image_server.engine.tiny import ensure_tiny_model
from qwen_image_server.engine.types import (
    EditSpec,
    GenerationSpec,
    PreviewPlan,
    StepEvent,
    digest_images,
)

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

# -- the real architecture ----------------------------------------------------------------------
# Qwen/Qwen-Image transformer/config.json. The same values are diffusers 0.42's defaults for
# QwenImageTransformer2DModel (models/transformers/transformer_qwenimage.py, __init__) and are
# hard-wired in DiffSynth-Studio's QwenImageDiT (diffsynth/models/qwen_image_dit.py: 60 blocks of
# dim 3072 = 24 heads x 128, img_in 64 -> 3072, txt_in 3584 -> 3072, rope axes [16, 56, 56]).
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

# Qwen/Qwen-Image vae/config.json: diffusers 0.42's AutoencoderKLQwenImage defaults
# (models/autoencoders/autoencoder_kl_qwenimage.py, __init__) and DiffSynth-Studio's QwenImageVAE
# (diffsynth/models/qwen_image_vae.py). latents_mean/std keep the class defaults (the real ones).
QWEN_IMAGE_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

# Qwen/Qwen-Image text_encoder/config.json = Qwen/Qwen2.5-VL-7B-Instruct, as spelled out in
# DiffSynth-Studio's QwenImageTextEncoder (diffsynth/models/qwen_image_text_encoder.py): 28 layers
# of 3584 with 28 query / 4 key-value heads, MLP 18944, vocabulary 152064, untied lm_head, mrope
# [16, 24, 24], and the 32-block 1280-wide vision tower (unused for text, but loaded and on the GPU).
QWEN25_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
}
QWEN25_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}
QWEN25_VL_TOKENS: dict[str, int] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
}

# -- what is measured ---------------------------------------------------------------------------
PROMPT = with_suffix("A cute cat sitting on a windowsill, golden hour light", "en")
CFG_SCALE = 4.0  # the API default: two transformer passes per step

# What `torch.cuda.get_device_properties(0).total_memory` reports on the card each class is named
# for: RTX 4090 (24564 MiB), RTX A6000 / RTX 6000 Ada (49140 MiB), H100 80GB HBM3 (81559 MiB).
CARD_GIB: dict[int, float] = {24: 24564 / 1024, 48: 49140 / 1024, 80: 81559 / 1024}

DEFAULT_CONFIGS = ("baseline", "compile", "fp8", "compile+fp8", "compile+fp8+all",
                   "compile+fp8+lightning", "cache", "compile+fp8+cache")
DEFAULT_MEMORY_CONFIGS = ("int8", "fp8+qte", "offload-model", "offload-model+fp8",
                          "offload-model+fp8+all+qte", "offload-sequential")
SMOKE_CONFIGS = ("baseline", "int8", "fp8", "cache")
SECTIONS = ("speed", "batch", "memory", "http", "edit", "preview", "lora", "attention")

# diffusers 0.42.1 attention backends an NVIDIA GPU could run (the `attention` section, on the
# first configuration). Those PyTorch provides (native = SDPA's own choice, the forced _native_*
# kernels, flex) need nothing; the others need a package, and a machine without it gets a row
# saying which and why (NOT_CARRIED).
ATTENTION_BACKENDS = ("native", "_native_flash", "_native_cudnn", "_native_efficient", "xformers",
                      "flex", "sage", "flash", "_flash_3", "_flash_3_hub", "flash_hub")
# Why a backend's package cannot be carried to a GPU machine that reaches no network (wheels
# travel with the run; docs/benchmarks.md, "The GPU speed table").
NOT_CARRIED: dict[str, str] = {
    "flash": "flash-attn has no wheel on PyPI (source only, an hour-long CUDA build)",
    "flash_varlen": "flash-attn has no wheel on PyPI (source only, an hour-long CUDA build)",
    "_flash_3": "FlashAttention 3 has no PyPI wheel (built from flash-attention's hopper/ sources)",
    "_flash_varlen_3": "FlashAttention 3 has no PyPI wheel (built from flash-attention's hopper/ sources)",
    "sage": "diffusers needs sageattention>=2.1.1, which PyPI has as source only (its wheel is 1.0.6)",
    "xformers": "carry xformers==0.0.35 in .whl (a 3 MB wheel; its CUDA extension is built for torch 2.10)",
}
HUB_NOTE = "the kernels package downloads the kernel from the Hugging Face Hub at first use: no network, no kernel"

# The speed table (--plan speed-table): its configurations in table order, and the order they
# run in: the rows the goals are about first, so a run cut by its time limit has them.
SPEED_TABLE_CONFIGS = ("baseline", "compile", "fp8", "compile+fp8", "compile+fp8+cache")
SPEED_TABLE_RUN_ORDER = ("baseline", "compile+fp8", "compile+fp8+cache", "fp8", "compile")
SPEED_TABLE_SECTIONS = ("speed", "attention", "http")
# End-to-end seconds of one 1024x1024, 50-step, cfg 4 image on one GPU.
SPEED_GOALS: dict[str, tuple[float, str]] = {
    "compile+fp8": (8.0, "fp8 + compile, no step caching"),
    "compile+fp8+cache": (4.5, "fp8 + compile + step caching"),
}

# Edits: Qwen-Image-Edit-2509 and -2511 have Qwen-Image's transformer, text encoder and VAE
# (2511's zero_cond_t adds no parameters and no work), so the edit rows run the same random
# components through QwenImageEditPlusPipeline.
EDIT_PROMPT = with_suffix("Make it a night scene with a full moon over the rooftops", "en")
# Published single-GPU edit times at about 1024x1024 with CFG, by step count, printed beside the
# rows with the same step count.
EDIT_ANCHORS: dict[int, str] = {
    40: "SGLang Diffusion, 1x H100: Edit-2509 40 steps 38.6 s",
    50: "SGLang Diffusion, 1x H100: Edit 50 steps 32.8 s; vLLM-Omni, H200: Edit 51.5 s "
        "(21.6 s with cache-dit)",
}

log = logging.getLogger("bench.gpu")

# torchao's quantization configs switch these inductor settings on for the whole process
# (torchao.quantization.utils.recommended_inductor_config_setter), and nothing switches them off.
INDUCTOR_SETTINGS = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions",
                     "force_fuse_int_mm_with_mul", "fx_graph_cache", "triton.unique_kernel_names")


def same_inductor_settings() -> dict[str, Any]:
    """Give the configuration about to be built the inductor settings every other one gets.

    The first quantized configuration would otherwise turn on torchao's settings for all that
    follow, so "compile" (built before it) and "compile+fp8" (after) would differ by more than
    fp8. Every configuration runs with torchao's settings (those a server with QWEN_IMAGE_QUANTIZE
    runs with) when torchao is installed. Returns them, for the JSON.
    """
    try:
        from torchao.quantization.utils import recommended_inductor_config_setter
    except ImportError:
        pass
    else:
        recommended_inductor_config_setter()
    return inductor_settings()


def inductor_settings() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in INDUCTOR_SETTINGS:
        value: Any = torch._inductor.config
        for part in name.split("."):
            value = getattr(value, part)
        values[name] = value
    return values


# -- configurations ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One named configuration: Settings fields for prepare_pipeline, plus a request-side change."""

    name: str
    options: tuple[tuple[str, Any], ...]  # Settings overrides, hashable so equal ones share a pipeline
    lightning_steps: int | None = None  # emulate a Lightning LoRA: this many steps, no CFG

    @property
    def settings_overrides(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def offloads(self) -> bool:
        return self.settings_overrides.get("offload", "none") != "none"

    @property
    def caches(self) -> bool:
        return self.settings_overrides.get("cache", "none") != "none"


def parse_config(name: str, cache_options: dict[str, Any]) -> BenchConfig:
    """'compile+fp8+cache' -> BenchConfig. Tokens: baseline, compile, fp8, int8, qte (quantize
    the text encoder too), all (no layer kept in bf16), cache, lightning[N], offload-model,
    offload-sequential, attn-<backend>."""
    # Every option explicit, so QWEN_IMAGE_* variables in the environment change nothing, and
    # offload is `none` rather than `auto`, which could pick differently from run to run.
    options: dict[str, Any] = {"offload": "none", "quantize": "none", "quantize_text_encoder": False,
                               "quantize_skip": ("img_mlp",), "compile": False, "cache": "none", "cache_options": {},
                               "lora": None,
                               "attention": "native", "warmup": False}
    lightning = None
    for token in name.split("+"):
        token = token.strip()
        if token == "baseline":
            continue
        if token == "compile":
            options["compile"] = True
        elif token in ("fp8", "int8"):
            options["quantize"] = token
        elif token == "qte":
            options["quantize_text_encoder"] = True  # the text encoder too (with fp8 or int8)
        elif token == "all":
            options["quantize_skip"] = ()  # img_mlp quantized too (QWEN_IMAGE_QUANTIZE_SKIP=)
        elif token == "cache":
            options["cache"] = "cache-dit"
            options["cache_options"] = cache_options
        elif token in ("offload-model", "offload-sequential"):
            options["offload"] = token.split("-", 1)[1]
        elif token.startswith("attn-"):
            options["attention"] = token[len("attn-"):]
        elif match := re.fullmatch(r"lightning(\d*)", token):
            lightning = int(match.group(1) or 8)  # Qwen-Image-Lightning's 8-step LoRA by default
        else:
            raise argparse.ArgumentTypeError(f"unknown configuration token {token!r} in {name!r}")
    frozen = tuple(sorted((k, json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
                          for k, v in options.items()))
    return BenchConfig(name, frozen, lightning)


def settings_for(config: BenchConfig, base: dict[str, Any]) -> Settings:
    overrides = config.settings_overrides
    if "cache_options" in overrides:
        overrides["cache_options"] = json.loads(overrides["cache_options"])
    return Settings(_env_file=None, **{**base, **overrides})


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def size_label(width: int, height: int) -> str:
    return f"{width}x{height}"


# -- building the pipeline -----------------------------------------------------------------------


def _fill(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
          generator: torch.Generator) -> torch.Tensor:
    """A random weight of the real shape. Values only need to stay finite through 60 blocks:
    biases 0, norm scales 1, matrices N(0, 0.02) (the usual init scale, so activations neither
    vanish nor overflow bf16)."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) <= 1:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)


def materialize(module: torch.nn.Module, dtype: torch.dtype, target: torch.device, seed: int) -> None:
    """Give every meta parameter of `module` real random values on `target`, one tensor at a time.

    Values are drawn on the GPU when there is one (fast) and copied to `target` when the plan
    needs the weights in host memory (offload); so host memory never holds a second copy.
    """
    source = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    generator = torch.Generator(device=source).manual_seed(seed)
    for module_name, sub in module.named_modules():
        for name, param in list(sub._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            value = _fill(f"{module_name}.{name}", param.shape, dtype, source, generator)
            sub._parameters[name] = torch.nn.Parameter(value.to(target), requires_grad=False)
    leftover = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters left on meta: {leftover[:3]}")


def build_full_pipeline(target: torch.device, cache_dir: Path, depth: int | None = None) -> Any:
    """The real Qwen-Image architecture with random bf16 weights on `target`, in seconds.

    The modules are built with parameters on the meta device (accelerate's init_empty_weights:
    no memory, no slow CPU init; buffers and the rope tables stay real), then filled in place.
    `depth` shrinks the transformer and text encoder to that many layers (dry runs on small
    machines); the widths stay real.
    """
    from accelerate import init_empty_weights
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
    )

    transformer_config = dict(QWEN_IMAGE_TRANSFORMER)
    text_config = dict(QWEN25_VL_7B_TEXT)
    if depth is not None:
        transformer_config["num_layers"] = depth
        text_config["num_hidden_layers"] = depth
    with init_empty_weights():
        transformer = QwenImageTransformer2DModel(**transformer_config)
        vae = AutoencoderKLQwenImage(**QWEN_IMAGE_VAE)
        config = Qwen2_5_VLConfig(text_config=text_config, vision_config=QWEN25_VL_7B_VISION,
                                  vocab_size=text_config["vocab_size"], tie_word_embeddings=False,
                                  **QWEN25_VL_TOKENS)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    dtype = torch.bfloat16
    for seed, component in enumerate((transformer, vae, text_encoder)):
        materialize(component, dtype, target, seed)
        component.eval()
    transformer.to(dtype=dtype)  # floating buffers too, as from_pretrained(dtype=bf16) leaves them
    vae.to(dtype=dtype)

    # The tokenizer and the scheduler are real: the tiny model folder carries Qwen's vocabulary and
    # Qwen-Image's scheduler config.
    folder = ensure_tiny_model(cache_dir)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                             text_encoder=text_encoder, tokenizer=tokenizer)


def load_tiny_pipeline(cache_dir: Path, dtype: torch.dtype) -> Any:
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(ensure_tiny_model(cache_dir), dtype=dtype)


def full_edit_pipeline(pipeline: Any) -> Any:
    """Qwen-Image-Edit-2509 / -2511 over `pipeline`'s modules (shared: nothing is copied or
    cast), with the Qwen2.5-VL processor that shows the input images to the text encoder."""
    from diffusers import QwenImageEditPlusPipeline

    from qwen_image_server.engine.edit import over_same_modules
    from qwen_image_server.engine.processor import build_processor

    return over_same_modules(QwenImageEditPlusPipeline, pipeline, processor=build_processor(pipeline.tokenizer))


# -- measuring ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One timed run_batch call."""

    steps: int
    e2e_s: float  # the whole call: text encoding, denoising, VAE decode, PIL conversion
    step_s: float  # mean denoising step (both CFG passes), from the step callbacks, step 1 excluded
    step_median_s: float
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    cache_note: str | None = None
    preview_s: list[float] = dataclasses.field(default_factory=list)  # each preview's own time

    @property
    def fixed_s(self) -> float:
        """Per-call time outside the denoising steps (text encoder, latents, VAE decode, PIL)."""
        return max(0.0, self.e2e_s - self.steps * self.step_s)

    def e2e_at(self, steps: int) -> float:
        return self.fixed_s + steps * self.step_s


def _sync(device: DeviceInfo) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def specs_for(width: int, height: int, steps: int, batch: int, cfg: float) -> list[GenerationSpec]:
    return [GenerationSpec(prompt=PROMPT if i == 0 else f"{PROMPT} #{i}", negative_prompt=" ",
                           width=width, height=height, num_inference_steps=steps,
                           true_cfg_scale=cfg, seed=42 + i)
            for i in range(batch)]


def edit_inputs(width: int, height: int, count: int) -> tuple[Image.Image, ...]:
    """`count` noise pictures of the output size, as decoded uploads reach the engine."""
    rng = np.random.default_rng(0)
    return tuple(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                 for _ in range(count))


def edit_specs(width: int, height: int, steps: int, pictures: tuple[Image.Image, ...],
               one_prompt_per_call: bool) -> list[EditSpec]:
    """One edit of `pictures` (as the server's request path makes it), cfg 4."""
    return [EditSpec(prompt=EDIT_PROMPT, negative_prompt=" ", width=width, height=height,
                     num_inference_steps=steps, true_cfg_scale=CFG_SCALE, seed=42, images=pictures,
                     inputs_digest=digest_images(pictures, None), one_prompt_per_call=one_prompt_per_call)]


def timed_run(engine: PipelineEngine, device: DeviceInfo, specs: Sequence[GenerationSpec]) -> Run:
    """Time one run_batch; the step callback synchronizes, so step stamps are GPU times."""
    stamps: list[float] = []
    previews: list[float] = []

    def on_step(event: StepEvent) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        previews.extend(preview.seconds for preview in event.previews.values())

    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # so the reserved peak is this run's, not an earlier shape's
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    engine.run_batch(list(specs), on_step)
    _sync(device)
    e2e = time.perf_counter() - start
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    if not gaps:  # one step: no gap between callbacks; the whole call is the only bound
        gaps = [e2e]
    peak_alloc = peak_reserved = None
    if device.type == "cuda":
        peak_alloc = torch.cuda.max_memory_allocated() / GiB
        peak_reserved = torch.cuda.max_memory_reserved() / GiB
    return Run(steps=len(stamps), e2e_s=e2e, step_s=statistics.fmean(gaps),
               step_median_s=statistics.median(gaps), peak_allocated_gib=peak_alloc,
               peak_reserved_gib=peak_reserved, preview_s=previews)


def cache_summary(pipeline: Any) -> str | None:
    """'cached 23 steps (+20 CFG)' from cache-dit's own counters for the last call, if it has them."""
    try:
        import cache_dit

        stats = cache_dit.summary(pipeline, logging=False)
    except Exception:  # noqa: BLE001 - stats are a nicety; the timing stands without them
        return None
    if not stats:
        return None
    cached = len(getattr(stats[0], "cached_steps", []) or [])
    cfg_cached = len(getattr(stats[0], "cfg_cached_steps", []) or [])
    return f"cached {cached} steps" + (f" (+{cfg_cached} CFG)" if cfg_cached else "")


# -- the benchmark --------------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    """A pipeline with one configuration's options applied, wrapped as the server wraps it."""

    options: tuple[tuple[str, Any], ...]  # BenchConfig.options it was built with
    caches: bool
    engine: PipelineEngine | None
    applied: str  # AppliedOptions.summary(): what prepare_pipeline really did
    build_s: float  # weights built (or loaded) and every option applied, before any warm-up
    warmed: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)  # size -> largest batch
    edit_engine: PipelineEngine | None = None  # made by the first edit unit


class Benchmark:
    def __init__(self, args: argparse.Namespace, device: DeviceInfo) -> None:
        self.args = args
        self.device = device
        self.full = args.model == "full"
        self.dtype = torch.bfloat16 if self.full else resolve_dtype("auto", device)
        self.started = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.previous: list[dict[str, Any]] = []
        self.configs_applied: dict[str, dict[str, Any]] = {}  # name -> what was applied, build time
        self.context_gib = self._cuda_context_gib()
        self.settings_base = {"model": "random-full-size" if self.full else "tiny", "device": device.type,
                              "log_level": "warning"}
        self.lora_folder = Path(tempfile.mkdtemp(prefix="qwen-bench-loras-"))  # the lora rows' LoRAs
        self.model_label = ("Qwen-Image, real architecture, random bf16 weights" if self.full
                            else f"embedded tiny Qwen-Image ({self.dtype})".replace("torch.", ""))
        if args.depth is not None:
            self.model_label += f", {args.depth} layers (dry run: not the real depth)"
        self.previous_configs: dict[str, dict[str, Any]] = {}
        if args.append and args.out.is_file():
            previous = json.loads(args.out.read_text())
            self.previous = previous.get("rows", [])
            self.previous_configs = previous.get("configs", {})

    # -- bookkeeping ----------------------------------------------------------------------------

    def _cuda_context_gib(self) -> float:
        """Device memory held outside torch's allocator: the CUDA context and the kernels loaded
        so far (and any other process on the GPU). It grows as libraries load, so it is measured
        again after each configuration and the largest value is used."""
        if self.device.type != "cuda":
            return 0.0
        torch.zeros(1, device="cuda")  # creates the context
        free, total = torch.cuda.mem_get_info()
        return max(0.0, (total - free - torch.cuda.memory_reserved()) / GiB)

    def finish(self) -> None:
        """Final context size; every fresh row's `fits` is judged with it."""
        self.context_gib = max(self.context_gib, self._cuda_context_gib())
        for row in self.rows:
            if row.get("peak_reserved_gib") is not None:
                row["fits"] = self.fits(row["peak_reserved_gib"])
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_budget(self) -> bool:
        return self.args.budget_s is not None and self.elapsed() > self.args.budget_s

    def done_before(self, section: str, config: BenchConfig, width: int, height: int, batch: int) -> bool:
        """With --append: a unit whose rows are already in the JSON, all without error, is not rerun.
        The attention unit is done when every backend has a row that is not a budget cut (a
        backend whose package is missing would only be refused again)."""
        if section == "attention":
            return all(self.previous_attention(config, width, height, backend) is not None
                       for backend in self.args.attention_backends)
        key = {"section": section, "config": config.name, "size": size_label(width, height),
               **self.unit_count(section, batch)}
        rows = [r for r in self.previous if all(r.get(k) == v for k, v in key.items())]
        return bool(rows) and not any(r.get("error") for r in rows)

    def previous_attention(self, config: BenchConfig, width: int, height: int, backend: str) -> dict[str, Any] | None:
        """With --append: this backend's row from the earlier run, unless the budget cut it."""
        for row in self.previous:
            if (row["section"] == "attention" and row["config"] == config.name and row.get("backend") == backend
                    and row["size"] == size_label(width, height)
                    and not str(row.get("error", "")).startswith("not run")):
                return row
        return None

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.save()  # after every row: a run stopped by a time limit keeps what it measured

    def merged_rows(self) -> list[dict[str, Any]]:
        keys = ("section", "config", "size", "batch", "images", "steps", "backend")
        fresh = {tuple(r.get(k) for k in keys) for r in self.rows}
        return [r for r in self.previous if tuple(r.get(k) for k in keys) not in fresh] + self.rows

    def document(self) -> dict[str, Any]:
        import diffusers

        architecture = None
        if self.full:
            architecture = {
                "transformer": {**QWEN_IMAGE_TRANSFORMER,
                                "axes_dims_rope": list(QWEN_IMAGE_TRANSFORMER["axes_dims_rope"])},
                "vae": QWEN_IMAGE_VAE,
                "text_encoder": {"text": QWEN25_VL_7B_TEXT, "vision": QWEN25_VL_7B_VISION},
                "depth_override": self.args.depth,
            }
        return {
            "benchmark": "bench/gpu.py",
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "device": self.device.label,
            "model": self.model_label,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "cuda_context_gib": round(self.context_gib, 2),
            "card_gib": CARD_GIB,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "configs": {**self.previous_configs, **self.configs_applied},
            "architecture": architecture,
            "rows": self.merged_rows(),
        }

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.document(), indent=2))
        tmp.replace(self.args.out)

    def row(self, section: str, config: BenchConfig, width: int, height: int, batch: int, steps: int,
            cfg: float, **values: Any) -> dict[str, Any]:
        return {"section": section, "config": config.name, "size": size_label(width, height),
                "batch": batch, "steps": steps, "cfg": cfg, **values}

    @staticmethod
    def unit_count(section: str, count: int) -> dict[str, int]:
        """A unit's last number as its rows record it: input images of an edit, else the batch."""
        return {"batch": 1, "images": count} if section == "edit" else {"batch": count}

    def failed(self, section: str, config: BenchConfig, width: int, height: int, batch: int, why: str) -> None:
        if section == "edit":
            steps, cfg = self.args.edit_steps[0], CFG_SCALE
        else:
            steps = config.lightning_steps or self.args.steps[0]
            cfg = 1.0 if config.lightning_steps else CFG_SCALE
        counts = self.unit_count(section, batch)
        self.add(self.row(section, config, width, height, counts.pop("batch"), steps, cfg, **counts, error=why))

    # -- pipelines ------------------------------------------------------------------------------

    def prepare(self, config: BenchConfig) -> Prepared:
        """A fresh pipeline with `config` applied by the server's prepare_pipeline, in a LoadedModel
        and a PipelineEngine (compile, quantization and cache all change the modules, so no
        pipeline is shared between configurations with different options)."""
        from qwen_image_server.engine.options import prepare_pipeline

        start = time.perf_counter()
        settings = settings_for(config, self.settings_base)
        lora = "lora" in self.args.sections and config.name == self.args.configs[0]
        if lora:
            # The lora rows' library; under compile, prepare_pipeline adds the hot-swap slot.
            settings = settings.model_copy(update={"lora_dir": self.lora_folder, "max_loras_per_request": 1,
                                                   "lora_max_rank": self.args.lora_rank})
        if self.full:
            # Offload plans start from weights in host memory, as a real load does.
            target = torch.device("cpu") if config.offloads else self.device.torch_device
            pipeline = build_full_pipeline(target, settings.cache_dir, self.args.depth)
        else:
            pipeline = load_tiny_pipeline(settings.cache_dir, self.dtype)
        same_inductor_settings()
        try:
            options = prepare_pipeline(pipeline, settings, self.device)
        except BaseException:
            self._unhook(pipeline, config.caches)
            del pipeline  # before the collection: this frame stays alive in the traceback
            self._collect()
            raise
        total, size_mb = count_parameters(pipeline)
        model = LoadedModel(pipeline=pipeline, name=settings.model, source="benchmark", device=self.device,
                            dtype=self.dtype, load_time=time.perf_counter() - start,
                            total_parameters=total, size_mb=size_mb, options=options)
        _sync(self.device)
        applied = options.summary()
        build_s = time.perf_counter() - start
        # What the configuration really runs with: read after prepare_pipeline, which quantizes.
        self.configs_applied[config.name] = {"applied": applied, "build_s": round(build_s, 1),
                                             "inductor": inductor_settings()}
        adapters = None
        if lora:
            from qwen_image_server.engine.adapters import ResidentAdapters
            from qwen_image_server.engine.lora_library import LoraLibrary

            library = LoraLibrary.from_settings(settings)
            adapters = ResidentAdapters(pipeline, library, model.name, "generate", 2,
                                        slots=1 if settings.compile else None)
        return Prepared(config.options, config.caches, PipelineEngine(model, adapters), applied, build_s)

    def edit_engine(self, prepared: Prepared, config: BenchConfig) -> PipelineEngine:
        """The edit model of this configuration, made once: the full-size edit pipeline over the
        prepared modules (the options they carry apply to edits too), or the embedded tiny edit
        model loaded by the server's own loader with the configuration's settings."""
        if prepared.edit_engine is None:
            assert prepared.engine is not None
            start = time.perf_counter()
            if self.full:
                generation = prepared.engine.model
                model = dataclasses.replace(generation, pipeline=full_edit_pipeline(generation.pipeline),
                                            name=f"{generation.name}-edit", task="edit")
            else:
                settings = settings_for(config, self.settings_base)
                model = load_model(settings, ModelRef(TINY_EDIT_MODEL_NAME, TINY_EDIT_MODEL_NAME))
            _sync(self.device)
            prepared.edit_engine = PipelineEngine(model)
            self.configs_applied.setdefault(config.name, {})["edit_build_s"] = round(
                time.perf_counter() - start, 1)
        return prepared.edit_engine

    def release(self, prepared: Prepared) -> None:
        assert prepared.engine is not None
        if prepared.edit_engine is not None:
            # The full-size edit pipeline shares the generation modules; let go of it first.
            self._unhook(prepared.edit_engine.pipeline, prepared.caches)
            prepared.edit_engine = None
        self._unhook(prepared.engine.pipeline, prepared.caches)
        prepared.engine = None
        self._collect()

    @staticmethod
    def _unhook(pipeline: Any, caches: bool) -> None:
        """Take off what holds the modules besides the pipeline: cache-dit and offload hooks."""
        if caches:
            try:
                import cache_dit

                cache_dit.disable_cache(pipeline)  # drops cache-dit's references to the blocks
            except Exception:  # noqa: BLE001 - best effort; the leftover check in _collect reports
                pass
        if hasattr(pipeline, "remove_all_hooks"):
            pipeline.remove_all_hooks()  # offload hooks hold the modules too

    def _collect(self) -> None:
        """Free what the released pipelines held. The caller holds no reference to them any more
        (a local variable in its frame would keep every weight alive through this check)."""
        torch.compiler.reset()  # compiled graphs hold the old modules' weights
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.context_gib = max(self.context_gib, self._cuda_context_gib())
            leftover = torch.cuda.memory_allocated() / GiB
            if leftover > 1.0:
                log.warning("%.1f GiB still allocated after a release: later peaks include it", leftover)

    def warm(self, engine: PipelineEngine, width: int, height: int, batch: int, cfg: float) -> float:
        """One call per shape, left out of the timings: compile traces the shape, cuDNN/cuBLAS pick
        plans, memory is allocated. Returns its seconds (what a server's warm-up pays)."""
        start = time.perf_counter()
        engine.run_batch(specs_for(width, height, self.args.warmup_steps, batch, cfg), lambda event: None)
        _sync(self.device)
        return time.perf_counter() - start

    # -- sections -------------------------------------------------------------------------------

    def speed(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int) -> None:
        """Per-step and end-to-end time at each --steps value (cfg 4), or the Lightning emulation."""
        measure = self.args.measure_steps
        if config.lightning_steps is not None:
            plan = [(config.lightning_steps, 1.0, True)]
        elif config.caches:
            # cache-dit's schedule depends on the step count: each count is its own run.
            plan = [(steps, CFG_SCALE, True) for steps in self.args.steps]
        else:
            plan = [(steps, CFG_SCALE, steps == measure) for steps in self.args.steps]
        lightning = config.lightning_steps is not None
        with lightning_scheduler(engine, lightning):
            warmup_s = self.warm(engine, width, height, 1, plan[0][1])
            runs: dict[int, Run] = {}
            for steps, cfg, measured in plan:
                timed = steps if measured else measure
                if timed not in runs:
                    runs[timed] = timed_run(engine, self.device, specs_for(width, height, timed, 1, cfg))
                    if config.caches:
                        runs[timed].cache_note = cache_summary(engine.pipeline)
                run = runs[timed]
                note = [f"cfg {cfg:g}: {'2 passes' if cfg > 1 else '1 pass'} per step"]
                if run.cache_note:
                    note.append(f"{run.cache_note} (random weights: not the real hit rate)")
                if lightning:
                    note.append("Lightning emulated: its steps, no CFG; a fused LoRA adds no per-step cost")
                server_warmup = self.configs_applied.get(config.name, {}).get(
                    "server_warmup_s_by_size", {}).get(size_label(width, height))
                self.add(self.row("speed", config, width, height, 1, steps, cfg,
                                  **self.values(run, steps, measured), warmup_s=round(warmup_s, 2),
                                  server_warmup_s=server_warmup, note="; ".join(note)))

    def edit(self, prepared: Prepared, config: BenchConfig, width: int, height: int, images: int) -> None:
        """Per-step and end-to-end time of one edit of `images` input images at each --edit-steps
        value (cfg 4), timed and derived as the speed rows are."""
        engine = self.edit_engine(prepared, config)
        one_prompt = engine.edits is not None and engine.edits.one_prompt_per_call
        pictures = edit_inputs(width, height, images)
        measure = self.args.measure_steps
        # cache-dit's schedule depends on the step count: each count is its own run.
        plan = [(steps, config.caches or steps == measure) for steps in self.args.edit_steps]
        warmup_s = None
        if self.args.edit_warmup:
            start = time.perf_counter()
            engine.run_batch(edit_specs(width, height, self.args.warmup_steps, pictures, one_prompt),
                             lambda event: None)
            _sync(self.device)
            warmup_s = round(time.perf_counter() - start, 2)
        runs: dict[int, Run] = {}
        for steps, measured in plan:
            timed = steps if measured else measure
            if timed not in runs:
                runs[timed] = timed_run(engine, self.device, edit_specs(width, height, timed, pictures, one_prompt))
                if config.caches:
                    runs[timed].cache_note = cache_summary(engine.pipeline)
            run = runs[timed]
            note = [f"{engine.model.pipeline_class}, {images} input image{'s' if images > 1 else ''} "
                    f"of {size_label(width, height)}", f"cfg {CFG_SCALE:g}: 2 passes per step"]
            if run.cache_note:
                note.append(f"{run.cache_note} (random weights: not the real hit rate)")
            if steps in EDIT_ANCHORS and self.full:
                note.append(f"anchor: {EDIT_ANCHORS[steps]}")
            self.add(self.row("edit", config, width, height, 1, steps, CFG_SCALE, images=images,
                              **self.values(run, steps, measured), warmup_s=warmup_s,
                              note="; ".join(note)))

    def lora(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int) -> None:
        """Per-request LoRAs: the step time with one unfused rank-R adapter active against none,
        and the time to switch between two resident adapters (between batches, as the server
        does). Random LoRAs on every attention projection of every block."""
        adapters = engine.adapters
        if adapters is None:
            raise RuntimeError("the lora rows run on the first configuration, built with a LoRA library")
        rank = self.args.lora_rank
        for name, seed in (("a", 1), ("b", 2)):
            random_lora(self.lora_folder / f"{name}.safetensors", engine.pipeline.transformer, rank, seed)
        steps = self.args.measure_steps
        one, other = (("a", 1.0),), (("b", 1.0),)

        def specs(loras: tuple) -> list[GenerationSpec]:
            return [dataclasses.replace(s, loras=loras) for s in specs_for(width, height, steps, 1, CFG_SCALE)]

        def activate(loras: tuple) -> float:
            _sync(self.device)
            begin = time.perf_counter()
            adapters.activate(loras)
            _sync(self.device)
            return time.perf_counter() - begin

        first_load = activate(one)
        activate(other)  # both resident from here on
        engine.run_batch(specs(one), lambda event: None)  # the adapter's first call (kernels)
        none_run = timed_run(engine, self.device, specs(()))
        one_run = timed_run(engine, self.device, specs(one))
        switches = [activate(loras) for _ in range(self.args.lora_switches) for loras in (other, one)]
        switch_ms = 1000 * statistics.median(switches)
        ratio = one_run.step_s / none_run.step_s
        self.add(self.row("lora", config, width, height, 1, steps, CFG_SCALE,
                          **self.values(one_run, steps, True), step_s_none=round(none_run.step_s, 4),
                          step_ratio=round(ratio, 3), switch_ms=round(switch_ms, 2),
                          first_load_ms=round(1000 * first_load, 1), lora_rank=rank,
                          note=f"one rank-{rank} adapter vs none: {ratio:.3f}x per step (goal <= 1.10); "
                               f"switch between resident adapters {switch_ms:.1f} ms (goal <= 50 ms); "
                               f"first load {1000 * first_load:.0f} ms"
                               + ("; hot-swapped into a compiled slot" if adapters.slots else "")))
    def preview(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int) -> None:
        """What previews cost per step: runs with a latent preview at every step and with a full
        (VAE decode) preview at every step, against plain runs of the same steps, interleaved
        (--preview-rounds rounds) so drift in the machine's speed hits all three alike. Each
        preview's own time is the engine's (the step's kernels finished first); the change in
        step time is what the batch pays."""
        steps = self.args.preview_steps
        start = time.perf_counter()
        engine.previewer  # noqa: B018 - the projection fit, as the server does it at load time
        fit_s = time.perf_counter() - start
        self.warm(engine, width, height, 1, CFG_SCALE)
        plans = {"plain": None, "latent": PreviewPlan("latent", every=1), "full": PreviewPlan("full", every=1)}
        runs: dict[str, list[Run]] = {name: [] for name in plans}
        for _ in range(self.args.preview_rounds):
            for name, plan in plans.items():
                specs = [dataclasses.replace(spec, preview=plan)
                         for spec in specs_for(width, height, steps, 1, CFG_SCALE)]
                runs[name].append(timed_run(engine, self.device, specs))
        step = statistics.median(run.step_median_s for run in runs["plain"])
        fields: dict[str, Any] = {}
        notes = []
        for mode in ("latent", "full"):
            each = statistics.median(s for run in runs[mode] for s in run.preview_s)
            mode_step = statistics.median(run.step_median_s for run in runs[mode])
            fields |= {f"{mode}_preview_s": round(each, 5), f"{mode}_ratio": round(each / step, 4),
                       f"{mode}_step_median_s": round(mode_step, 4)}
            notes.append(f"{mode}: {each * 1000:.1f} ms = {each / step:.1%} of a step "
                         f"(median step {mode_step / step - 1:+.1%})")
        self.add(self.row("preview", config, width, height, 1, steps, CFG_SCALE,
                          **self.values(runs["plain"][0], steps, True), **fields, fit_s=round(fit_s, 3),
                          fit_correlation=round(engine.previewer.projection.correlation, 3),
                          note="preview every step; " + "; ".join(notes) + f"; projection fit {fit_s:.2f} s"))

    def values(self, run: Run, steps: int, measured: bool) -> dict[str, Any]:
        e2e = run.e2e_s if measured else run.e2e_at(steps)
        return {
            "step_s": round(run.step_s, 4),
            "step_median_s": round(run.step_median_s, 4),
            "e2e_s": round(e2e, 3),
            "e2e_measured": measured,
            "timed_steps": run.steps,
            "fixed_s": round(run.fixed_s, 3),
            "peak_allocated_gib": _round(run.peak_allocated_gib),
            "peak_reserved_gib": _round(run.peak_reserved_gib),
            "fits": self.fits(run.peak_reserved_gib),
        }

    def fits(self, peak_reserved_gib: float | None) -> dict[str, bool] | None:
        """Whether this plan fits a card of each class: its reserved peak plus the CUDA context."""
        if peak_reserved_gib is None:
            return None
        need = peak_reserved_gib + self.context_gib
        return {str(gb): need <= capacity for gb, capacity in CARD_GIB.items()}

    def batch(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int, batch: int) -> None:
        """Throughput of one batched call: images per minute at the first --steps value."""
        self.warm(engine, width, height, batch, CFG_SCALE)
        run = timed_run(engine, self.device, specs_for(width, height, self.args.measure_steps, batch, CFG_SCALE))
        steps = self.args.steps[0]
        values = self.values(run, steps, steps == self.args.measure_steps)
        values["images_per_min"] = round(60.0 * batch / values["e2e_s"], 2)
        self.add(self.row("batch", config, width, height, batch, steps, CFG_SCALE, **values,
                          note=f"{batch} images per call"))

    def memory(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int, applied: str) -> None:
        """Peak memory of a plan at the largest size; timed too, without a warm-up (a server
        with this plan pays the same first call)."""
        run = timed_run(engine, self.device, specs_for(width, height, self.args.memory_steps, 1, CFG_SCALE))
        steps = self.args.steps[0]
        self.add(self.row("memory", config, width, height, 1, steps, CFG_SCALE,
                          **self.values(run, steps, steps == self.args.memory_steps), note=applied))

    def http(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int) -> None:
        """One request through the real app (uvicorn, scheduler thread, overlay/PNG, HTTP) vs the
        same spec through the raw engine, both with the server's prompt cache
        (QWEN_IMAGE_PROMPT_CACHE_MB, as a server makes it: engine/models.py); and the raw engine
        without the cache, which is what the cache saves (the text encoder's time). Medians of
        interleaved repeats after a warm-up."""
        import httpx

        from qwen_image_server.config.presets import DEFAULT_NEGATIVE_PROMPT
        from qwen_image_server.engine.prompt_cache import PromptCache

        cache_mb = Settings(_env_file=None, **self.settings_base).prompt_cache_mb
        cached = PipelineEngine(engine.model, engine.adapters,
                                PromptCache(int(cache_mb * 2**20), pinned=[DEFAULT_NEGATIVE_PROMPT]))
        steps = self.args.measure_steps
        body, route, spec = http_request(width, height, steps)
        times: dict[str, list[float]] = {"raw": [], "uncached": [], "http": []}
        with serve(cached, self.settings_base) as url, httpx.Client(base_url=url, timeout=3600) as client:
            def over_http() -> float:
                begin = time.perf_counter()
                client.post(route, json=body).raise_for_status()
                return time.perf_counter() - begin

            def raw(through: PipelineEngine) -> float:
                begin = time.perf_counter()
                through.run_batch([spec], lambda event: None)
                _sync(self.device)
                return time.perf_counter() - begin

            over_http()  # warm-up: the first request through every layer; it fills the cache
            for _ in range(self.args.http_repeats):  # interleaved, so drift affects all alike
                times["raw"].append(raw(cached))
                times["uncached"].append(raw(engine))
                times["http"].append(over_http())
        raw_s, uncached_s, http_s = (statistics.median(times[k]) for k in ("raw", "uncached", "http"))
        stats = cached.prompts.stats()
        self.add(self.row("http", config, width, height, 1, steps, CFG_SCALE, e2e_s=round(http_s, 3),
                          e2e_measured=True, raw_s=round(raw_s, 3), overhead_s=round(http_s - raw_s, 4),
                          ratio=round(http_s / raw_s, 4), raw_uncached_s=round(uncached_s, 3),
                          prompt_cache_mb=cache_mb, prompt_cache_saved_s=round(uncached_s - raw_s, 3),
                          prompt_cache_hits=stats.hits, prompt_cache_misses=stats.misses,
                          note=f"POST {route} vs raw run_batch {raw_s:.3f} s, both with the prompt cache "
                               f"({cache_mb:g} MiB; {stats.hits} hits, {stats.misses} misses): "
                               f"+{1000 * (http_s - raw_s):.0f} ms, ratio {http_s / raw_s:.3f}; the cache "
                               f"saves {1000 * (uncached_s - raw_s):.0f} ms per image (raw without it "
                               f"{uncached_s:.3f} s)"))

    def attention(self, engine: PipelineEngine, config: BenchConfig, width: int, height: int) -> None:
        """One row per --attention-backends backend on this configuration's pipeline: the
        server's own check of the backend (QWEN_IMAGE_ATTENTION; a missing package is a row saying
        which and why), then a warm call and a timed --measure-steps run with the backend set,
        the end-to-end time derived at the largest --steps value. The configuration's own
        backend is put back afterwards."""
        from qwen_image_server.engine.options import OptionUnavailable, check_options

        transformer = engine.pipeline.transformer
        own = config.settings_overrides["attention"]
        measure, steps = self.args.measure_steps, max(self.args.steps)
        try:
            for backend in self.args.attention_backends:
                if (previous := self.previous_attention(config, width, height, backend)) is not None:
                    log.info("attention %s: kept from %s", backend, self.args.out)
                    self.add(previous)
                    continue
                fields = {"backend": backend}
                if self.out_of_budget():
                    self.add(self.row("attention", config, width, height, 1, steps, CFG_SCALE, **fields,
                                      error=f"not run: time budget ({self.args.budget_s:.0f} s) spent; "
                                            "rerun with --append"))
                    continue
                try:
                    check_options(settings_for(parse_config(f"{config.name}+attn-{backend}", self.args.cache_options),
                                               self.settings_base), self.device)
                except OptionUnavailable as exc:
                    why = NOT_CARRIED.get(backend, HUB_NOTE if backend.endswith("_hub") else None)
                    self.add(self.row("attention", config, width, height, 1, steps, CFG_SCALE, **fields,
                                      skipped=True, error=f"{exc}" + (f" [{why}]" if why else "")))
                    continue
                try:
                    transformer.set_attention_backend(backend)
                    warmup_s = self.warm(engine, width, height, 1, CFG_SCALE)
                    run = timed_run(engine, self.device, specs_for(width, height, measure, 1, CFG_SCALE))
                except Exception as exc:  # noqa: BLE001 - a kernel that cannot run these shapes
                    log.warning("attention %s failed: %s", backend, _first_line(exc))
                    self.add(self.row("attention", config, width, height, 1, steps, CFG_SCALE, **fields,
                                      error=_first_line(exc)))
                    del exc
                    self._collect_cuda()
                    continue
                self.add(self.row("attention", config, width, height, 1, steps, CFG_SCALE, **fields,
                                  **self.values(run, steps, steps == measure), warmup_s=round(warmup_s, 2),
                                  note=f"QWEN_IMAGE_ATTENTION={backend} on {config.name}"))
        finally:
            transformer.set_attention_backend(own)

    def _collect_cuda(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # -- driver ---------------------------------------------------------------------------------

    def unit(self, prepared: Prepared, config: BenchConfig, section: str, width: int, height: int,
             batch: int) -> None:
        """Run one unit unless the time budget is spent; a failure becomes an error row and the
        benchmark goes on."""
        if self.out_of_budget():
            self.failed(section, config, width, height, batch,
                        f"not run: time budget ({self.args.budget_s:.0f} s) spent; rerun with --append")
            return
        engine = prepared.engine
        assert engine is not None
        first_row, graphs, start = len(self.rows), compiled_graphs(), time.perf_counter()
        try:
            if section == "speed":
                self.speed(engine, config, width, height)
            elif section == "batch":
                self.batch(engine, config, width, height, batch)
            elif section == "memory":
                self.memory(engine, config, width, height, prepared.applied)
            elif section == "edit":
                self.edit(prepared, config, width, height, batch)
            elif section == "lora":
                self.lora(engine, config, width, height)
            elif section == "preview":
                self.preview(engine, config, width, height)
            elif section == "attention":
                self.attention(engine, config, width, height)
            else:
                self.http(engine, config, width, height)
        except Exception as exc:  # noqa: BLE001 - one failing unit must not lose the others
            log.warning("%s %s %dx%d batch %d failed: %s", section, config.name, width, height, batch,
                        _first_line(exc))
            self.failed(section, config, width, height, batch, _first_line(exc))
            del exc
            if self.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        # Where the time budget goes, for planning the next (time-limited) GPU run.
        log.info("%s %s %dx%d x%d took %.1fs", section, config.name, width, height, batch,
                 time.perf_counter() - start)
        if config.settings_overrides.get("compile"):
            # After the server's warm-up nothing should compile (goal 0): each new graph here is
            # one a live request would wait for.
            recompiled = compiled_graphs() - graphs
            for row in self.rows[first_row:]:
                row["recompiles"] = recompiled
                if recompiled:
                    row["note"] = "; ".join(filter(None, [row.get("note"), f"{recompiled} graphs "
                                                          "compiled after the server's warm-up"]))
            self.save()

    def server_warm_up(self, prepared: Prepared, config: BenchConfig,
                       units: Sequence[tuple[str, int, int, int]]) -> None:
        """The server's compile warm-up (`PipelineEngine.warm_up_size`) for every size and batch
        the units will run, so each row can count what live traffic would still compile."""
        engine = prepared.engine
        assert engine is not None
        wanted: dict[tuple[int, int], int] = {}
        for section, width, height, batch in units:
            if section == "edit":  # the edit model warms itself up (its untimed first call)
                continue
            wanted[(width, height)] = max(wanted.get((width, height), 1), batch if section == "batch" else 1)
        start = time.perf_counter()
        applied = self.configs_applied.setdefault(config.name, {})
        by_size = applied.setdefault("server_warmup_s_by_size", {})
        for (width, height), batch in wanted.items():
            if prepared.warmed.get((width, height), 0) >= batch:
                continue
            size_start = time.perf_counter()
            try:
                engine.warm_up_size(width, height, self.args.warmup_steps, max_batch_size=batch)
            except Exception as exc:  # noqa: BLE001 - the unit itself will fail and say why
                log.warning("%s: warm-up of %dx%d failed: %s", config.name, width, height, _first_line(exc))
                continue
            # What a server with QWEN_IMAGE_COMPILE spends on this size before /ready turns 200.
            by_size[size_label(width, height)] = round(time.perf_counter() - size_start, 1)
            prepared.warmed[(width, height)] = batch
        seconds = time.perf_counter() - start
        applied["server_warmup_s"] = round(seconds, 1)
        log.info("%s: server warm-up of %d sizes in %.1fs", config.name, len(wanted), seconds)

    def plan(self) -> list[tuple[BenchConfig, list[tuple[str, int, int, int]]]]:
        """(configuration, its units) in run order; units --append already has are left out."""
        args = self.args
        plan = []
        for i, name in enumerate(args.configs):
            config = parse_config(name, args.cache_options)
            units = [("speed", w, h, 1) for w, h in args.sizes] if "speed" in args.sections else []
            if i == 0:  # batching and the server's overhead are measured on the first configuration
                if "batch" in args.sections:
                    units += [("batch", w, h, b) for w, h in args.batch_sizes for b in args.batches]
                if "http" in args.sections:
                    units.append(("http", *args.http_size, 1))
                if "edit" in args.sections:
                    units += [("edit", *args.edit_size, n) for n in args.edit_images]
                if "preview" in args.sections:
                    units.append(("preview", *args.preview_size, 1))
                if "attention" in args.sections:  # every backend on this configuration's pipeline
                    units.append(("attention", *args.attention_size, 1))
                if "lora" in args.sections:  # last: the speed rows above run without adapters
                    units.append(("lora", *args.lora_size, 1))
            plan.append((config, units))
        if "memory" in args.sections:
            if self.device.type == "cuda":
                largest = max(args.sizes, key=lambda s: s[0] * s[1])
                plan += [(parse_config(n, args.cache_options), [("memory", *largest, 1)])
                         for n in args.memory_configs]
            else:
                log.info("memory section skipped: peak GPU memory needs a GPU")
        return [(config, [u for u in units if not self.done_before(u[0], config, *u[1:])])
                for config, units in plan]

    def run(self) -> None:
        current: Prepared | None = None
        for config, units in self.plan():
            if not units:
                continue
            # Consecutive configurations with the same options (compile+fp8, then its Lightning
            # rows) share one pipeline: the build and the compile warm-up are paid once.
            if current is not None and current.options != config.options:
                self.release(current)
                current = None
            if current is None:
                if self.out_of_budget():
                    for section, w, h, b in units:
                        self.failed(section, config, w, h, b, f"not run: time budget "
                                    f"({self.args.budget_s:.0f} s) spent; rerun with --append")
                    continue
                log.info("building %s", config.name)
                try:
                    current = self.prepare(config)
                except Exception as exc:  # noqa: BLE001 - an option that cannot apply here
                    log.warning("%s: %s", config.name, _first_line(exc))
                    for section, w, h, b in units:
                        self.failed(section, config, w, h, b, f"prepare_pipeline: {_first_line(exc)}")
                    continue
                log.info("%s ready in %.1fs: %s", config.name, current.build_s, current.applied)
            if config.settings_overrides.get("compile"):
                self.server_warm_up(current, config, units)
            for section, w, h, b in units:
                self.unit(current, config, section, w, h, b)
        if current is not None:
            self.release(current)
        self.finish()


@contextmanager
def lightning_scheduler(engine: PipelineEngine, active: bool) -> Iterator[None]:
    """Lightning samples with its own shift-3 scheduler (engine.lora); swapped in for its rows only."""
    if not active:
        yield
        return
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qwen_image_server.engine.lora import LIGHTNING_SCHEDULER_OVERRIDES

    pipeline = engine.pipeline
    original = pipeline.scheduler
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        original.config, **LIGHTNING_SCHEDULER_OVERRIDES)
    try:
        yield
    finally:
        pipeline.scheduler = original


def random_lora(path: Path, transformer: Any, rank: int, seed: int) -> Path:
    """A random rank-`rank` LoRA (diffusers key format) on every attention projection of the
    transformer blocks, written straight from the layers' shapes (no copy of a 20B transformer)."""
    from safetensors.torch import save_file

    from qwen_image_server.engine.lora_library import transformer_linears
    from qwen_image_server.engine.tiny import LORA_TARGETS

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (fan_in, fan_out) in transformer_linears(transformer).items():
        if name.startswith("transformer_blocks.") and name.endswith(tuple(f".{t}" for t in LORA_TARGETS)):
            weights[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5).to(torch.bfloat16)
            weights[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=generator) / rank ** 0.5).to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"base_model": "Qwen-Image"})
    return path


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


# -- the HTTP server ------------------------------------------------------------------------------


def http_request(width: int, height: int, steps: int) -> tuple[dict[str, Any], str, GenerationSpec]:
    """The body, route and the spec the server makes of it: /generate for a preset size (the
    native API only takes presets), else the OpenAI route, which takes any WxH."""
    from qwen_image_server.serving.model_registry import ANY_MODEL
    from qwen_image_server.serving.specs import build_specs

    preset = next((name for name, wh in ASPECT_RATIOS.items() if wh == (width, height)), None)
    common = {"prompt": "A cute cat sitting on a windowsill", "num_inference_steps": steps,
              "true_cfg_scale": CFG_SCALE, "seed": 42}
    if preset is not None:
        from qwen_image_server.protocol.native import GenerateRequest

        body = {**common, "aspect_ratio": preset}
        return body, "/generate", build_specs(GenerateRequest(**body), model=ANY_MODEL, loras=(), seeds=[42])[0]
    from qwen_image_server.protocol.openai import ImageGenerationRequest

    body = {**common, "size": size_label(width, height), "n": 1}
    return body, "/v1/images/generations", build_specs(ImageGenerationRequest(**body), model=ANY_MODEL, loras=(),
                                                       seeds=[42])[0]


@contextmanager
def serve(engine: PipelineEngine, base: dict[str, Any]) -> Iterator[str]:
    """The real app (create_app) around this engine, served by uvicorn on a free local port."""
    import httpx
    import uvicorn

    from qwen_image_server.api.app import create_app
    from qwen_image_server.launch.http import GracefulServer

    with tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        settings = Settings(_env_file=None, **{**base, "output_dir": Path(tmp), "threads": 2,
                                               "max_batch_size": 1})
        app = create_app(settings, engine_factory=lambda: engine)
        server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                               lifespan="on"))
        thread = threading.Thread(target=server.run, name="bench-server", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while not server.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            while httpx.get(f"{url}/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready")
                time.sleep(0.1)
            yield url
        finally:
            server.should_exit = True
            thread.join(60)


# -- the table ------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{3 if abs(value) < 1 else digits}f}"


def _fits(fits: dict[str, bool] | None) -> str:
    if not fits:
        return "–"
    return "/".join("yes" if fits[str(gb)] else "no" for gb in CARD_GIB)


def _versus(row: dict[str, Any], rows: Sequence[dict[str, Any]], steps: Sequence[int]) -> str:
    """Speed-up of a speed row over the baseline at the same size (Lightning: over the baseline's
    largest step count, the run it replaces)."""
    if row["section"] != "speed" or row.get("error") or not row.get("e2e_s"):
        return ""
    reference_steps = max(steps) if row["cfg"] <= 1.0 else row["steps"]
    for other in rows:
        if (other["section"] == "speed" and other["config"] == "baseline" and other["size"] == row["size"]
                and other["steps"] == reference_steps and other.get("e2e_s") and not other.get("error")):
            return f"{other['e2e_s'] / row['e2e_s']:.2f}x"
    return ""


def headline(rows: Sequence[dict[str, Any]], size: str = "1024x1024", steps: int = 50) -> str | None:
    """The fastest 1024x1024 / 50-step image without lossy options, and with them."""
    speed = [r for r in rows if r["section"] == "speed" and r["size"] == size and not r.get("error")
             and r.get("e2e_s")]
    exact = [r for r in speed if r["steps"] == steps and r["cfg"] > 1.0]
    if not exact:
        return None
    lossless = [r for r in exact if "cache" not in r["config"].split("+")]
    parts = []
    if lossless:
        best = min(lossless, key=lambda r: r["e2e_s"])
        parts.append(f"near-lossless best {best['e2e_s']:.2f} s ({best['config']})")
    # Lossy: step caching at the same step count, or a Lightning run, which replaces it.
    lossy = [r for r in exact if r not in lossless] + [r for r in speed if r["cfg"] <= 1.0]
    if lossy:
        best = min(lossy, key=lambda r: r["e2e_s"])
        parts.append(f"with lossy options {best['e2e_s']:.2f} s ({best['config']}, {best['steps']} steps)")
    return f"{size}, {steps} steps, cfg {CFG_SCALE:g}: " + "; ".join(parts)


def edit_headline(rows: Sequence[dict[str, Any]], size: str) -> str | None:
    """Each edit's end-to-end time at `size`, by input images and steps, and the published
    times at the same step counts."""
    edits = [r for r in rows if r["section"] == "edit" and r["size"] == size and not r.get("error")
             and r.get("e2e_s")]
    if not edits:
        return None
    parts = []
    for images in sorted({r["images"] for r in edits}):
        runs = sorted((r for r in edits if r["images"] == images), key=lambda r: (r["steps"], r["e2e_s"]))
        times = ", ".join(f"{r['steps']} steps {r['e2e_s']:.2f} s ({r['config']})" for r in runs)
        parts.append(f"{images} input image{'s' if images > 1 else ''}: {times}")
    line = f"edit {size}, cfg {CFG_SCALE:g}: " + "; ".join(parts)
    anchors = [EDIT_ANCHORS[steps] for steps in sorted({r["steps"] for r in edits}) if steps in EDIT_ANCHORS]
    if anchors:
        line += "\nedit anchors: " + "; ".join(anchors)
    return line


# -- two GPUs, estimated from one ---------------------------------------------------------------

# Effective bandwidth of one collective between two GPUs, and the fixed cost of each call.
# NVLink 4 (H100 / H200 SXM) is 450 GB/s each way; all-to-all and all-gather reach less.
LINKS: dict[str, tuple[float, float]] = {"NVLink": (300e9, 15e-6), "PCIe Gen4": (25e9, 30e-6)}


def parallel_estimates(step_s: float, fixed_s: float, width: int, height: int, steps: int, cfg: float,
                       layers: int = QWEN_IMAGE_TRANSFORMER["num_layers"],
                       inner_dim: int = QWEN_IMAGE_TRANSFORMER["num_attention_heads"]
                       * QWEN_IMAGE_TRANSFORMER["attention_head_dim"]) -> list[dict[str, Any]]:
    """One image on two GPUs, from one GPU's measured step (both CFG passes) and fixed time
    (text encoder, VAE decode: not split), by the bytes each mode's collectives move per step.

    CFG-parallel: each GPU runs one of the two passes; one all-gather of the noise prediction
    per step (image tokens x 64 channels, bf16). Ulysses over 2: each GPU runs half the tokens of
    every pass; each block exchanges query, key, value and output by all-to-all, each GPU sending
    (U-1)/U^2 of each full tensor (tokens x inner_dim, bf16). Image tokens only (the prompt's ~100
    tokens add ~2%). Not measured: docs/multi-gpu.md lists the published speed-ups to compare.
    """
    tokens = (width // 16) * (height // 16)  # VAE /8, then 2x2 patches
    passes = 2 if cfg > 1 else 1
    one_gpu = fixed_s + steps * step_s
    estimates = []
    for mode in ("cfg", "ulysses"):
        if mode == "cfg" and passes == 1:
            continue  # without CFG both GPUs compute the one pass: one-GPU speed
        for link, (bandwidth, latency) in LINKS.items():
            if mode == "cfg":
                sent = tokens * 64 * 2
                comm = sent / bandwidth + latency
            else:
                calls = layers * passes * 4
                sent = calls * tokens * inner_dim * 2 * (2 - 1) // 2**2
                comm = sent / bandwidth + calls * latency
            step = step_s / 2 + comm
            e2e = fixed_s + steps * step
            estimates.append({"mode": mode, "gpus": 2, "link": link, "step_s": round(step, 4),
                              "e2e_s": round(e2e, 3), "speedup": round(one_gpu / e2e, 2),
                              "mib_per_step": round(sent / 2**20, 2), "comm_s_per_step": round(comm, 5)})
    return estimates


def parallel_lines(rows: Sequence[dict[str, Any]], size: str = "1024x1024", steps: int = 50) -> list[str]:
    """'2 GPUs (estimate) from <config>: ...' for the baseline and the fastest near-lossless
    configuration measured at `size` and `steps` (step caching does not combine with several
    GPUs)."""
    speed = [r for r in rows if r["section"] == "speed" and r["size"] == size and r["steps"] == steps
             and r["cfg"] > 1.0 and not r.get("error") and r.get("step_s")
             and "cache" not in r["config"].split("+")]
    picks = [r for r in speed if r["config"] == "baseline"]
    if speed:
        best = min(speed, key=lambda r: r["e2e_s"])
        if best not in picks:
            picks.append(best)
    lines = []
    for row in picks:
        width, height = parse_size(size)
        parts = [f"{e['mode']} over {e['link']} {e['e2e_s']:.2f} s ({e['speedup']:.2f}x, "
                 f"{e['mib_per_step']:g} MiB per step)"
                 for e in parallel_estimates(row["step_s"], row["fixed_s"], width, height, steps, row["cfg"])]
        lines.append(f"2 GPUs (estimate) from {row['config']}, one GPU {row['e2e_s']:.2f} s: " + "; ".join(parts))
    return lines


# -- the speed table (--plan speed-table) -----------------------------------------------------


def _goal_verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= goal else "missed"


def speed_table(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The speed table of a --plan speed-table run (a JSON document, possibly cut short): every
    planned row, measured or saying why not, then the goals met or missed. Returns the Markdown
    and the same facts as a dict (the JSON's `speed_table`)."""
    args, rows = doc["args"], doc["rows"]
    steps = max(args["steps"])
    size = size_label(*args["sizes"][0])
    cut = "not measured: the run ended before this row (time limit); run the same command again (it appends)"
    by_config = {r["config"]: r for r in rows if r["section"] == "speed" and r["size"] == size and r["steps"] == steps}
    applied = doc.get("configs", {})
    configs = [c for c in SPEED_TABLE_CONFIGS if c in args["configs"]] + [
        c for c in args["configs"] if c not in SPEED_TABLE_CONFIGS]
    baseline = by_config.get("baseline")
    header = "| row | configuration | s/step | e2e s | vs baseline | warm-up s | recompiles after warm-up | note |"
    lines = [f"Qwen-Image {size}, cfg {CFG_SCALE:g}, {steps} steps on {doc['device']} ({doc['model']}); "
             f"torch {doc['torch']}, diffusers {doc['diffusers']}", "", header, "|" + "---|" * (header.count("|") - 1)]
    facts: dict[str, Any] = {"size": size, "steps": steps, "rows": []}

    def versus(row: dict[str, Any] | None) -> str:
        if not row or not baseline or baseline.get("error") or row.get("error") or not row.get("e2e_s"):
            return ""
        return f"{baseline['e2e_s'] / row['e2e_s']:.2f}x"

    def line(kind: str, name: str, row: dict[str, Any] | None, warmup: Any = None, note: str = "") -> None:
        if row is None:
            lines.append(f"| {kind} | {name} | – | – | | – | – | {cut} |")
            facts["rows"].append({"row": kind, "config": name, "error": cut})
            return
        if row.get("error"):
            lines.append(f"| {kind} | {name} | – | – | | – | – | {row['error']} |")
            facts["rows"].append({"row": kind, "config": name, "error": row["error"]})
            return
        source = "" if row.get("e2e_measured") else f" (from a {row.get('timed_steps')}-step run)"
        recompiles = row.get("recompiles")
        lines.append(f"| {kind} | {name} | {_num(row.get('step_s'), 3)} | {_num(row.get('e2e_s'))}{source} | "
                     f"{versus(row)} | {_num(warmup, 1) if warmup is not None else '–'} | "
                     f"{'–' if recompiles is None else recompiles} | {note or row.get('note', '')} |")
        facts["rows"].append({"row": kind, "config": name, "step_s": row.get("step_s"), "e2e_s": row.get("e2e_s"),
                              "warmup_s": warmup, "recompiles": recompiles})

    for config in configs:
        row = by_config.get(config)
        warmup = (row or {}).get("server_warmup_s")
        if warmup is None:
            warmup = applied.get(config, {}).get("server_warmup_s_by_size", {}).get(size)
        line("speed", config, row, warmup, (row or {}).get("note", "") + (
            f"; built in {applied[config]['build_s']:.0f} s" if row and applied.get(config, {}).get("build_s") else ""))

    first = args["configs"][0]
    attention = {r.get("backend"): r for r in rows if r["section"] == "attention"}
    cut_unit = next((r for r in rows if r["section"] == "attention" and not r.get("backend")), None)
    if "attention" in args["sections"]:
        for backend in args["attention_backends"]:
            row = attention.get(backend, cut_unit)
            line("attention", f"{first}+attn-{backend}", row)
    measured = {b: r for b, r in attention.items() if b and not r.get("error") and r.get("step_s")}
    if measured:
        fastest = min(measured, key=lambda b: measured[b]["step_s"])
        facts["fastest_attention"] = fastest
        native = measured.get("native")
        ratio = f", {native['step_s'] / measured[fastest]['step_s']:.2f}x native's step" if native else ""
        facts["fastest_attention_line"] = (f"fastest attention backend: {fastest} "
                                           f"({measured[fastest]['step_s']:.3f} s/step{ratio})")

    if "http" in args["sections"]:
        http = next((r for r in rows if r["section"] == "http"), None)
        if http is not None and not http.get("error"):
            lines.append(f"| http | {first}, prompt cache on, {http['steps']} steps | – | {_num(http['e2e_s'])} "
                         f"| | – | – | {http['note']} |")
            facts["rows"].append({"row": "http", "config": first, "e2e_s": http["e2e_s"], "raw_s": http["raw_s"],
                                  "ratio": http["ratio"], "prompt_cache_saved_s": http.get("prompt_cache_saved_s")})
        else:
            line("http", f"{first}, prompt cache on", http)

    width, height = parse_size(size)
    for config in ("baseline", "compile+fp8"):
        row = by_config.get(config)
        if row is None or row.get("error") or not row.get("step_s"):
            continue
        for estimate in parallel_estimates(row["step_s"], row["fixed_s"], width, height, steps, row["cfg"]):
            name = f"{config}, 2 GPUs {estimate['mode']}, {estimate['link']}"
            lines.append(f"| estimate | {name} | {_num(estimate['step_s'], 3)} | {_num(estimate['e2e_s'])} | "
                         f"{versus(estimate)} | – | – | estimated from the row above, not measured: "
                         f"{estimate['mib_per_step']:g} MiB exchanged per step; {estimate['speedup']:.2f}x "
                         f"{config} on one GPU |")
            facts["rows"].append({"row": "estimate", "config": name, **estimate})

    goals = []
    for config, (goal, what) in SPEED_GOALS.items():
        row = by_config.get(config)
        value = None if row is None or row.get("error") else row.get("e2e_s")
        verdict = _goal_verdict(value, goal)
        goals.append({"goal": f"{what}: <= {goal:g} s", "config": config, "e2e_s": value, "verdict": verdict})
    compiled = [(c, by_config.get(c)) for c in configs if "compile" in c.split("+")]
    counts = {c: r.get("recompiles") for c, r in compiled if r and not r.get("error")}
    verdict = "not measured" if not counts else ("met" if all(v == 0 for v in counts.values()) else "missed")
    goals.append({"goal": "recompilations after the server's warm-up: 0", "counts": counts, "verdict": verdict})
    facts["goals"] = goals
    lines.append("")
    for goal in goals:
        value = (f"{goal['e2e_s']:.2f} s ({goal['config']})" if goal.get("e2e_s") is not None
                 else ", ".join(f"{c} {n}" for c, n in goal.get("counts", {}).items()) or goal.get("config", ""))
        lines.append(f"- goal {goal['goal']}: **{goal['verdict']}** ({value})")
    if "fastest_attention_line" in facts:
        lines.append(f"- {facts['fastest_attention_line']}")
    return "\n".join(lines), facts


def render_table(rows: Sequence[dict[str, Any]], steps: Sequence[int]) -> str:
    header = ("| section | config | size | batch | steps | s/step | e2e s | e2e from | vs baseline "
              "| img/min | peak GiB | fits 24/48/80 GB | note |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        if row.get("backend"):
            row = {**row, "config": f"{row['config']}+attn-{row['backend']}"}
        if row.get("error"):
            lines.append(f"| {row['section']} | {row['config']} | {row['size']} | {row['batch']} | "
                         f"{row['steps']} | – | – | – | | – | – | – | {row['error']} |")
            continue
        source = "measured" if row.get("e2e_measured") else f"{row.get('timed_steps')}-step run"
        peak = row.get("peak_reserved_gib")
        lines.append(
            f"| {row['section']} | {row['config']} | {row['size']} | {row['batch']} | {row['steps']} | "
            f"{_num(row.get('step_s'), 3)} | {_num(row.get('e2e_s'))} | {source} | {_versus(row, rows, steps)} | "
            f"{_num(row.get('images_per_min'), 1)} | {_num(peak, 1)} | {_fits(row.get('fits'))} | "
            f"{row.get('note', '')} |")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Configuration tokens, joined with '+': baseline, compile, fp8, "
                                            "int8, qte (text encoder quantized too), cache, lightning[N], "
                                            "offload-model, offload-sequential, attn-<diffusers backend>.")
    parser.add_argument("--plan", choices=("speed-table",), default=None,
                        help="speed-table: the table of docs/benchmarks.md's 'The GPU speed table' "
                             f"({', '.join(SPEED_TABLE_CONFIGS)}, every attention backend, the server "
                             "against the raw engine) at 1024x1024, 50 steps, within --budget-s; it "
                             "appends to --out, prints the table and the goals met, and writes it as "
                             "Markdown beside the JSON")
    parser.add_argument("--report", action="store_true",
                        help="with --plan: only print and write the table of the JSON at --out (after a "
                             "run stopped by its time limit)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny models, 2 steps, CPU-capable configurations: a check that the "
                             "benchmark works (about half a minute on 2 cores)")
    parser.add_argument("--model", choices=("auto", "full", "tiny"), default="auto",
                        help="full: real architecture, random weights (default on CUDA); tiny: the "
                             "embedded test model (default on CPU)")
    parser.add_argument("--depth", type=int, default=None,
                        help="full model with this many transformer / text encoder layers (dry runs only)")
    parser.add_argument("--sizes", type=_csv(parse_size), default=None,
                        help="WxH list (default 512x512,1024x1024,1328x1328,1664x928)")
    parser.add_argument("--steps", type=_csv(int), default=None, help="step counts reported (default 20,50)")
    parser.add_argument("--measure-steps", type=int, default=None,
                        help="steps of the timed run from which other step counts are derived as "
                             "fixed + steps x s/step (default 6; cache configurations always run "
                             "each count)")
    parser.add_argument("--configs", type=_csv(str), default=None,
                        help=f"speed configurations (default {','.join(DEFAULT_CONFIGS)}); batch and "
                             "http use the first")
    parser.add_argument("--memory-configs", type=_csv(str), default=None,
                        help=f"extra memory plans (default {','.join(DEFAULT_MEMORY_CONFIGS)})")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps of the untimed call before each shape is timed (default 2)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory-plan run")
    parser.add_argument("--batches", type=_csv(int), default=None, help="batch sizes (default 1,2,4)")
    parser.add_argument("--batch-sizes", type=_csv(parse_size), default=None,
                        help="image sizes of the batch section (default 512x512,1024x1024)")
    parser.add_argument("--http-size", type=parse_size, default=None,
                        help="size of the HTTP request (default 1024x1024)")
    parser.add_argument("--http-repeats", type=int, default=None, help="timed HTTP requests (default 2)")
    parser.add_argument("--edit-images", type=_csv(int), default=None,
                        help="input images per edit, one row set each (default 1,3; at most 3)")
    parser.add_argument("--edit-steps", type=_csv(int), default=None,
                        help="step counts of the edit rows (default 40,50)")
    parser.add_argument("--edit-size", type=parse_size, default=None,
                        help="output and input image size of the edit rows (default 1024x1024)")
    parser.add_argument("--edit-warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="an untimed edit before each edit unit is timed (default on; off with "
                             "--smoke, where the tiny model's three-image edit takes most of a minute)")
    parser.add_argument("--lora-size", type=parse_size, default=None,
                        help="image size of the lora rows (default 1024x1024)")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of the lora rows' random LoRAs")
    parser.add_argument("--lora-switches", type=int, default=5, help="timed adapter switches, each way")
    parser.add_argument("--preview-size", type=parse_size, default=None,
                        help="image size of the preview row (default 1024x1024)")
    parser.add_argument("--preview-steps", type=int, default=None,
                        help="steps of each preview run: enough gaps for a median step (default 6)")
    parser.add_argument("--preview-rounds", type=int, default=None,
                        help="rounds of interleaved plain/latent/full preview runs (default 2)")
    parser.add_argument("--sections", type=_csv(str), default=None,
                        help=f"any of {','.join(SECTIONS)} (default all; --plan speed-table: "
                             f"{','.join(SPEED_TABLE_SECTIONS)})")
    parser.add_argument("--attention-backends", type=_csv(str), default=None,
                        help=f"the attention section's diffusers backends (default {','.join(ATTENTION_BACKENDS)})")
    parser.add_argument("--attention-size", type=parse_size, default=None,
                        help="image size of the attention rows (default 1024x1024)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of compiled configurations (eager: the graphs and "
                             "recompilations without inductor's code generation, for CPU checks)")
    parser.add_argument("--skip-http", action="store_true", help="leave out the http section")
    parser.add_argument("--cache-options", type=json.loads, default=None,
                        help='cache-dit DBCacheConfig knobs as JSON, e.g. \'{"residual_diff_threshold": 0.12}\' '
                             "(default: cache-dit's own; the smoke run computes 1 front block, the tiny "
                             "model has 2)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new unit after this many seconds (default 420 on CUDA: the "
                             "run ends inside a 10-minute limit; --append continues it)")
    parser.add_argument("--append", action="store_true",
                        help="merge into --out, skipping units it already has without error")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/gpu-<device>-<date>.json)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if args.model == "auto":
        args.model = "full" if cuda else "tiny"
    if args.report and args.plan is None:
        parser.error("--report prints a --plan's table: give the --plan")
    if args.plan == "speed-table":
        # The table's rows and nothing else; anything given on the command line still wins.
        plan = {"sizes": [(1024, 1024)], "steps": [50], "measure_steps": 6, "configs": list(SPEED_TABLE_RUN_ORDER),
                "sections": list(SPEED_TABLE_SECTIONS), "http_size": (1024, 1024), "attention_size": (1024, 1024)}
        if args.smoke:  # the same plan on the tiny model: tiny images, a few steps
            # (the OpenAI route's smallest size is 256x256)
            plan |= {"sizes": [(128, 128)], "steps": [4], "measure_steps": 2, "http_size": (256, 256),
                     "attention_size": (128, 128)}
        for name, value in plan.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        args.append = True  # a second try continues the first one's JSON
    if args.smoke:
        defaults = {"sizes": [(256, 256)], "steps": [2], "measure_steps": 2, "warmup_steps": 2, "http_repeats": 1,
                    "configs": list(SMOKE_CONFIGS), "memory_configs": [], "batches": [1, 2],
                    "batch_sizes": [(256, 256)], "http_size": (256, 256),
                    "edit_images": [2], "edit_steps": [2], "edit_size": (256, 256), "edit_warmup": False,
                    "lora_size": (256, 256), "preview_size": (256, 256), "preview_steps": 3,
                    "preview_rounds": 1, "attention_size": (256, 256)}
    else:
        defaults = {"sizes": [(512, 512), (1024, 1024), (1328, 1328), (1664, 928)], "steps": [20, 50],
                    "measure_steps": 6, "warmup_steps": 2, "configs": list(DEFAULT_CONFIGS),
                    "memory_configs": list(DEFAULT_MEMORY_CONFIGS), "batches": [1, 2, 4],
                    "batch_sizes": [(512, 512), (1024, 1024)], "http_size": (1024, 1024), "http_repeats": 2,
                    "edit_images": [1, 3], "edit_steps": [40, 50], "edit_size": (1024, 1024),
                    "edit_warmup": True, "lora_size": (1024, 1024),
                    "preview_size": (1024, 1024), "preview_steps": 6, "preview_rounds": 2,
                    "attention_size": (1024, 1024)}
    # The smoke run leaves the attention backends to --plan speed-table --smoke, which has them.
    sections = [s for s in SECTIONS if not (args.smoke and s == "attention")]
    defaults |= {"sections": sections, "attention_backends": list(ATTENTION_BACKENDS)}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.cache_options is None:
        # The tiny transformer has 2 blocks, and cache-dit's default computes 8 before caching.
        args.cache_options = {"Fn_compute_blocks": 1, "max_warmup_steps": 1} if args.model == "tiny" else {}
    if args.budget_s is None and cuda:
        # The speed table's first try must end inside one 10-minute device call with its table
        # printed: no new unit after 390 s leaves the longest one (a compiled configuration's
        # build and warm-up) time to finish.
        args.budget_s = 390.0 if args.plan else 420.0
    if args.skip_http:
        args.sections = [s for s in args.sections if s != "http"]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.preview_steps < 3 or args.preview_rounds < 1:
        parser.error("--preview-steps must be at least 3 (two gaps for a median step), --preview-rounds at least 1")
    if args.measure_steps < 2:
        parser.error("--measure-steps must be at least 2 (step time is the gap between steps)")
    # One step is not a valid run: Qwen-Image's scheduler config (shift_terminal 0.02) makes the
    # only sigma of a 1-step schedule NaN.
    if min(args.warmup_steps, args.memory_steps, *args.steps, *args.edit_steps) < 2:
        parser.error("--steps, --edit-steps, --warmup-steps and --memory-steps must each be at least 2")
    if not all(1 <= n <= 3 for n in args.edit_images):
        parser.error("--edit-images: Qwen-Image-Edit-2509 / -2511 take one to three input images")
    for name in (*args.configs, *args.memory_configs):
        try:
            parse_config(name, args.cache_options)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    for w, h in (*args.sizes, *args.batch_sizes, args.http_size, args.edit_size, args.preview_size,
                 args.attention_size):
        if w % 16 or h % 16:
            parser.error(f"{w}x{h}: Qwen-Image needs sides that are multiples of 16")
    return args


def device_slug(device: DeviceInfo) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (device.gpu or device.type).lower()).strip("-")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "torchao", "cache_dit", "qwen_image_server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = resolve_device("cpu" if args.smoke else "auto")
    if args.out is None:
        suffix = "-smoke" if args.smoke else ""
        args.out = ROOT / "bench" / "results" / f"gpu-{device_slug(device)}{suffix}-{dt.date.today():%Y%m%d}.json"

    if args.plan and args.report:
        return report(args.out)
    if args.compile_backend != "inductor":
        use_compile_backend(args.compile_backend)

    bench = Benchmark(args, device)
    log.info("device %s, model: %s; writing %s", device.label, bench.model_label, args.out)
    bench.run()
    rows = bench.merged_rows()
    print(f"\nQwen-Image on {device.label}: {bench.model_label}; torch {torch.__version__}; "
          f"{bench.elapsed():.0f} s")
    print(render_table(rows, args.steps))
    if (line := headline(rows)) is not None:
        print(f"\n{line}")
    if (line := edit_headline(rows, size_label(*args.edit_size))) is not None:
        print(f"\n{line}")
    estimates = parallel_lines(rows, *((size_label(*args.sizes[0]), max(args.steps)) if args.plan else ()))
    if estimates:
        print("\n" + "\n".join(estimates))
    print(f"\nsteps: denoising steps, cfg {CFG_SCALE:g} = 2 transformer passes per step (Lightning: 1). "
          f"e2e: the whole run_batch call (text encoder, denoising, VAE decode, PIL); 'N-step run': "
          f"fixed + steps x s/step from a timed N-step run. edit: one edit of 1-3 input images "
          f"(VAE and vision encoding of the inputs included). peak: max GPU memory reserved; fits: "
          f"peak + {bench.context_gib:.2f} GiB CUDA context <= the card's memory. JSON: {args.out}")
    if args.plan:
        return report(args.out)
    return 0


def report(out: Path) -> int:
    """Print the speed table of the JSON at `out`, write it beside it as Markdown and into the
    JSON (`speed_table`)."""
    if not out.is_file():
        print(f"no benchmark JSON at {out}: nothing measured yet", file=sys.stderr)
        return 1
    doc = json.loads(out.read_text())
    markdown, facts = speed_table(doc)
    doc["speed_table"] = facts
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(markdown + "\n")
    print(f"\n== The GPU speed table ({out.with_suffix('.md')}) ==\n{markdown}")
    return 0


def use_compile_backend(backend: str) -> None:
    """Compile the transformer blocks with `backend` instead of inductor (what
    engine.compilation.compile_blocks asks diffusers for)."""
    from diffusers import QwenImageTransformer2DModel

    original = QwenImageTransformer2DModel.compile_repeated_blocks

    def compile_repeated_blocks(self: Any, **kwargs: Any) -> Any:
        return original(self, **{**kwargs, "backend": backend})

    QwenImageTransformer2DModel.compile_repeated_blocks = compile_repeated_blocks  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
