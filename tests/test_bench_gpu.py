"""bench/gpu.py --smoke: the GPU benchmark runs end to end on the tiny model on the CPU, so a
broken benchmark is found here rather than on a rented GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SIZES = {"256x256"}


def _needs(config: str) -> str | None:
    """The optional package a smoke configuration needs, when it is not installed."""
    package = {"int8": "torchao", "fp8": "torchao", "cache": "cache_dit"}.get(config)
    return package if package and importlib.util.find_spec(package) is None else None


@pytest.mark.timeout(420)
def test_smoke_run_times_every_configuration_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]

    for config in ("baseline", "int8", "fp8", "cache"):
        speed = [r for r in rows if r["section"] == "speed" and r["config"] == config]
        assert {r["size"] for r in speed} == SMOKE_SIZES, (config, speed)
        if (package := _needs(config)) is not None:
            # Without the optional package the row says so instead of a time.
            assert all(package.replace("_", "-") in r["error"] for r in speed), speed
            continue
        for row in speed:
            assert not row.get("error"), row
            assert row["steps"] == 2 and row["e2e_measured"], row
            assert row["e2e_s"] > 0 and row["step_s"] > 0, row
            assert row["e2e_s"] >= row["step_s"], row
        # What prepare_pipeline reports it applied, as the server's startup log shows it.
        applied = {"baseline": "quantize=none", "int8": "quantize=int8", "fp8": "quantize=fp8",
                   "cache": "cache=cache-dit"}[config]
        assert applied in doc["configs"][config]["applied"], doc["configs"]

    # Quantizing sets inductor options for the whole process; every configuration runs with the
    # same ones, so configurations differ only by their own options.
    inductor = [doc["configs"][config]["inductor"] for config in ("baseline", "int8", "fp8", "cache")]
    assert all(settings == inductor[0] for settings in inductor), inductor

    batches = {r["batch"]: r for r in rows if r["section"] == "batch"}
    assert set(batches) == {1, 2}
    assert all(r["images_per_min"] > 0 for r in batches.values()), batches

    (http,) = [r for r in rows if r["section"] == "http"]
    assert http["raw_s"] > 0 and http["e2e_s"] > 0 and http["ratio"] > 0, http

    # Per-request LoRAs on the first configuration: a random rank-64 adapter against none, and
    # the switch between two resident ones.
    (lora,) = [r for r in rows if r["section"] == "lora"]
    assert not lora.get("error"), lora
    assert lora["lora_rank"] == 64 and lora["config"] == "baseline", lora
    assert lora["step_s"] > 0 and lora["step_s_none"] > 0 and lora["step_ratio"] > 0, lora
    assert lora["switch_ms"] > 0 and lora["first_load_ms"] > 0, lora

    # Edits on the tiny edit model: one row per number of input images, timed like the speed rows
    # (the smoke run edits two images: the multi-image path; one image is edited below).
    edits = {r["images"]: r for r in rows if r["section"] == "edit"}
    assert set(edits) == {2}, edits
    for images, row in edits.items():
        assert not row.get("error"), row
        assert row["size"] == "256x256" and row["steps"] == 2 and row["e2e_measured"], row
        assert row["e2e_s"] > row["step_s"] > 0, row
        assert f"{images} input image" in row["note"], row
    assert doc["configs"]["baseline"]["edit_build_s"] >= 0
    assert "| edit | baseline | 256x256 | 1 | 2 |" in proc.stdout
    assert "edit 256x256, cfg 4: 2 input images: 2 steps" in proc.stdout

    # Previews: a latent and a full preview at every step, each timed against a plain step.
    (preview,) = [r for r in rows if r["section"] == "preview"]
    assert not preview.get("error"), preview
    assert preview["size"] == "256x256" and preview["steps"] == 3 and preview["step_median_s"] > 0, preview
    for mode in ("latent", "full"):
        assert preview[f"{mode}_preview_s"] > 0 and preview[f"{mode}_ratio"] > 0, preview
    # A full preview decodes with the VAE; a latent one is a small matmul.
    assert preview["full_preview_s"] > preview["latent_preview_s"], preview
    assert "latent: " in preview["note"] and "% of a step" in preview["note"], preview

    # The table a user reads: its header, and one line per row.
    assert "| section | config | size | batch | steps | s/step | e2e s |" in proc.stdout
    assert "| speed | cache | 256x256 | 1 | 2 |" in proc.stdout
    assert proc.stdout.count("\n| ") == len(rows) + 1


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_full_size_edit_pipeline_shares_the_generation_modules_and_edits(tmp_path: Path, small_working_size) -> None:
    """The GPU run's edit model: the generation pipeline's modules in a QwenImageEditPlusPipeline,
    through the server's engine (here over the tiny modules, which have the same layout)."""
    import dataclasses

    import torch

    from qwen_image_server.config.settings import Settings
    from qwen_image_server.engine.device import resolve_device
    from qwen_image_server.engine.loaded import LoadedModel
    from qwen_image_server.engine.loader import count_parameters
    from qwen_image_server.engine.options import prepare_pipeline
    from qwen_image_server.engine.runner import PipelineEngine

    gpu = _bench_gpu()
    settings = Settings(_env_file=None, model="tiny", device="cpu", output_dir=tmp_path)
    device = resolve_device("cpu")
    # bfloat16, as on a GPU: making the edit pipeline must not cast the shared modules.
    pipeline = gpu.load_tiny_pipeline(settings.cache_dir, torch.bfloat16)
    total, size_mb = count_parameters(pipeline)
    generation = LoadedModel(pipeline=pipeline, name="tiny", source="benchmark", device=device,
                             dtype=torch.bfloat16, load_time=0.0, total_parameters=total, size_mb=size_mb,
                             options=prepare_pipeline(pipeline, settings, device))
    edit = gpu.full_edit_pipeline(pipeline)
    assert type(edit).__name__ == "QwenImageEditPlusPipeline"
    for name in ("transformer", "text_encoder", "vae", "tokenizer"):
        assert getattr(edit, name) is getattr(pipeline, name), name  # shared, not copied
    for name in ("transformer", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(pipeline, name).parameters()} == {torch.bfloat16}, name

    engine = PipelineEngine(dataclasses.replace(generation, pipeline=edit, task="edit"))
    assert engine.edits is not None and engine.edits.one_prompt_per_call
    steps: list[tuple[int, int]] = []
    pictures = gpu.edit_inputs(64, 64, 1)
    (image,) = engine.run_batch(gpu.edit_specs(64, 64, 2, pictures, True),
                                lambda event: steps.append((event.step, event.total)))
    assert image.size == (64, 64)
    assert steps == [(1, 2), (2, 2)]


def test_memory_plans_of_the_real_architecture() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_plans.py")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| ") and "GiB" not in line}
    # 20.43B transformer and 8.29B text encoder parameters in bf16, as Qwen/Qwen-Image ships them.
    assert rows["bf16"][1:5] == ["38.05", "15.45", "0.24", "53.74"]
    # An 80 GB card holds bf16 whole; a 24 GB card needs every layer in fp8 and a 2 GiB headroom
    # before model offload fits (columns: 24/48/80 GB at headroom 6, then at headroom 2).
    assert rows["bf16"][5:8] == ["sequential", "model", "none"]
    assert rows["fp8, every layer"][5] == "sequential" and rows["fp8, every layer"][8] == "model"
