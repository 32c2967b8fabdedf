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


SPEED_TABLE = ("baseline", "compile", "fp8", "compile+fp8", "compile+fp8+cache")


@pytest.mark.timeout(420)
def test_speed_table_plan_has_every_row_measured_or_saying_why(tmp_path: Path) -> None:
    """--plan speed-table on the tiny model: the table a GPU run prints, with every planned row
    measured or giving its reason, the goals judged, and the Markdown written beside the JSON."""
    gpu = _bench_gpu()
    out = tmp_path / "speed-table.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--plan", "speed-table", "--smoke",
                           "--compile-backend", "eager", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    table = doc["speed_table"]
    rows = {(r["row"], r["config"]): r for r in table["rows"]}
    assert table["size"] == "128x128" and table["steps"] == 4

    for config in SPEED_TABLE:
        row = rows[("speed", config)]
        missing = [p for p in ("torchao", "cache_dit") if importlib.util.find_spec(p) is None
                   and (p == "torchao" and "fp8" in config or p == "cache_dit" and "cache" in config)]
        if missing:
            assert row["error"], row  # the reason instead of a time
            continue
        assert not row.get("error"), row
        assert row["e2e_s"] > 0 and row["step_s"] > 0, row
        if "compile" in config.split("+"):
            # The server's own warm-up for this size, timed; after it nothing compiles (goal 0).
            assert row["warmup_s"] > 0 and row["recompiles"] == 0, row
        else:
            assert row["recompiles"] is None, row

    # One row per attention backend: PyTorch's own run on the CPU; the rest say why not.
    for backend in gpu.ATTENTION_BACKENDS:
        row = rows[("attention", f"baseline+attn-{backend}")]
        assert row.get("error") or row["step_s"] > 0, row
    assert not rows[("attention", "baseline+attn-native")].get("error")
    assert "NVIDIA GPUs only" in rows[("attention", "baseline+attn-flash")]["error"]
    assert "no wheel on PyPI" in rows[("attention", "baseline+attn-flash")]["error"]
    assert "Hugging Face Hub" in rows[("attention", "baseline+attn-_flash_3_hub")]["error"]
    assert table["fastest_attention"] in gpu.ATTENTION_BACKENDS

    # The server against the raw engine, both with the prompt cache, which served the prompts.
    http = rows[("http", "baseline")]
    assert http["e2e_s"] > 0 and http["raw_s"] > 0 and http["ratio"] > 0, http
    (raw_http,) = [r for r in doc["rows"] if r["section"] == "http"]
    assert raw_http["prompt_cache_hits"] > 0 and raw_http["prompt_cache_mb"] == 256, raw_http

    # Two GPUs, estimated from the measured step: CFG-parallel and Ulysses over NVLink and PCIe.
    estimates = [r for (kind, _), r in rows.items() if kind == "estimate" and r["config"].startswith("baseline,")]
    assert {(r["mode"], r["link"]) for r in estimates} == {
        ("cfg", "NVLink"), ("cfg", "PCIe Gen4"), ("ulysses", "NVLink"), ("ulysses", "PCIe Gen4")}
    # Two GPUs at best halve the steps (each does half of every step, plus its exchanges).
    assert all(0 < r["speedup"] <= 2.0 for r in estimates), estimates

    goals = {g["goal"]: g["verdict"] for g in table["goals"]}
    assert set(goals) == {"fp8 + compile, no step caching: <= 8 s", "fp8 + compile + step caching: <= 4.5 s",
                          "recompilations after the server's warm-up: 0"}
    assert set(goals.values()) <= {"met", "missed"}, goals

    markdown = out.with_suffix(".md").read_text()
    assert markdown.strip() in proc.stdout
    assert markdown.count("\n| ") == len(table["rows"]) + 1  # the header, then one line per row
    assert "- goal fp8 + compile, no step caching: <= 8 s: **" in markdown
    assert "- fastest attention backend: " in markdown


def test_speed_table_of_a_run_cut_short_names_the_rows_it_lacks(tmp_path: Path) -> None:
    """A run stopped by its time limit keeps its JSON; --report prints the table with the rows it
    did not reach marked, and a second run with the same command appends to it."""
    gpu = _bench_gpu()
    args = gpu.parse_args(["--plan", "speed-table", "--smoke", "--out", str(tmp_path / "t.json")])
    assert args.append and args.configs[:3] == ["baseline", "compile+fp8", "compile+fp8+cache"]
    row = {"section": "speed", "config": "baseline", "size": "128x128", "batch": 1, "steps": 4, "cfg": 4.0,
           "step_s": 0.5, "e2e_s": 2.5, "e2e_measured": False, "timed_steps": 2, "fixed_s": 0.5}
    doc = {"device": "NVIDIA H200", "model": "Qwen-Image", "torch": "2.11", "diffusers": "0.42.1",
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "configs": {}, "rows": [row]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--plan", "speed-table", "--smoke",
                           "--report", "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    cut = [line for line in lines if "the run ended before this row" in line]
    # 4 speed rows, every attention backend and the HTTP row were not reached.
    assert len(cut) == 4 + len(gpu.ATTENTION_BACKENDS) + 1, proc.stdout
    assert "| speed | baseline | 0.500 | 2.50 (from a 2-step run) | 1.00x |" in proc.stdout
    assert "goal fp8 + compile, no step caching: <= 8 s: **not measured**" in proc.stdout


def test_two_gpu_estimate_of_the_real_model_at_1024() -> None:
    """The bytes behind docs/multi-gpu.md's estimate: CFG-parallel gathers 0.5 MiB of noise
    prediction per step; Ulysses over two GPUs sends 24 MiB per block and pass from each GPU."""
    gpu = _bench_gpu()
    # The H200's measured baseline: 0.347 s per step, 17.5 s for 50 steps.
    estimates = {(e["mode"], e["link"]): e for e in
                 gpu.parallel_estimates(0.347, 17.5 - 50 * 0.347, 1024, 1024, 50, 4.0)}
    assert estimates[("cfg", "NVLink")]["mib_per_step"] == 0.5
    assert estimates[("ulysses", "NVLink")]["mib_per_step"] == 60 * 2 * 24
    assert 1.8 < estimates[("cfg", "NVLink")]["speedup"] < 2.0
    # Ulysses pays for its all-to-all: much more over PCIe than over NVLink.
    assert estimates[("ulysses", "PCIe Gen4")]["speedup"] < estimates[("ulysses", "NVLink")]["speedup"] < 2.0
    # Without CFG there is one pass per step: CFG-parallel has nothing to split.
    assert {e["mode"] for e in gpu.parallel_estimates(0.17, 1.0, 1024, 1024, 8, 1.0)} == {"ulysses"}
