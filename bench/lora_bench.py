#!/usr/bin/env python3
"""Per-request LoRA benchmark on the embedded tiny model (or QWEN_IMAGE_MODEL's generation model).

Prints, from one run on this machine, with two random LoRAs made by PEFT for the model's transformer:
  step:   seconds per denoising step without a LoRA, and with one unfused adapter active
          (ratio; goal on a GPU <= 1.10)
  switch: milliseconds to switch the active adapter set between batches once both are resident
          (goal on a GPU <= 50 ms), and the first load of an adapter for comparison
  compile (--compile): the same with QWEN_IMAGE_COMPILE=1 (adapters hot-swapped into slots), and
          the graphs compiled after warm-up while switching (goal 0). `--backend eager` keeps
          dynamo's guards (what recompiles) without inductor's compile time, for a CPU.

    .venv/bin/python bench/lora_bench.py [--steps 4] [--size 256] [--rank 4] [--repeats 5]
                                         [--compile] [--backend inductor|eager] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.types import GenerationSpec


def measure(settings: Settings, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    """Step times without and with one adapter, switch and load times, recompilations."""
    from qwen_image_server.engine import compilation
    from qwen_image_server.engine.models import load_engine
    from qwen_image_server.engine.tiny import build_lora

    model_set = load_engine(settings)
    engine = next(e for e in model_set.engines.values() if e.model.task == "generate")
    adapters = engine.adapters
    assert adapters is not None
    transformer = engine.pipeline.transformer
    if not (folder / "a.safetensors").exists():
        for name, seed in (("a", 1), ("b", 2)):
            build_lora(folder / f"{name}.safetensors", transformer, base="Qwen-Image", rank=args.rank, seed=seed)
    spec = GenerationSpec("a lighthouse at dusk", " ", args.size, args.size, args.steps, 4.0, seed=3,
                          model=engine.model.name)
    a, b = (("a", 1.0),), (("b", 0.8),)

    def call(loras: tuple) -> float:
        start = time.perf_counter()
        engine.run_batch([dataclasses.replace(spec, loras=loras)], lambda event: None)
        return time.perf_counter() - start

    def timed_activate(loras: tuple) -> float:
        start = time.perf_counter()
        adapters.activate(loras)
        if engine.model.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - start

    call(())  # this size's first call (and its compile)
    first_load = timed_activate(a)
    timed_activate(b)
    call(a)
    call(b)
    graphs = compilation.compiled_graphs()
    plain, one = [], []
    for _ in range(args.repeats):  # interleaved so drift affects both alike
        plain.append(call(()) / args.steps)
        one.append(call(a) / args.steps)
    switches = []
    for _ in range(args.repeats):
        switches += [timed_activate(b), timed_activate(a), timed_activate(())]
    for loras in ((), a, b, (("a", 0.5), ("b", 1.0)), ()):
        call(loras)
    step_plain, step_one = statistics.median(plain), statistics.median(one)
    return {
        "step_s_none": round(step_plain, 4),
        "step_s_one_adapter": round(step_one, 4),
        "step_ratio": round(step_one / step_plain, 3),
        "switch_ms": round(statistics.median(switches) * 1000, 2),
        "first_load_ms": round(first_load * 1000, 2),
        "recompiles_after_warmup": compilation.compiled_graphs() - graphs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=4, help="the tiny model is 32 wide: 4 is a real LoRA's share")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure under QWEN_IMAGE_COMPILE=1")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    base = Settings(log_level="warning", lora_dir=folder, max_loras_per_request=2,
                    lora_max_rank=max(args.rank, 8), max_batch_size=1,
                    max_batch_pixels=args.size * args.size)
    if base.model == "tiny":
        base = base.model_copy(update={"model": "tiny=tiny"})  # the generation model only
    results = {"eager": measure(base, args, folder)}
    if args.compile:
        import torch
        from diffusers import QwenImageTransformer2DModel

        original = QwenImageTransformer2DModel.compile_repeated_blocks
        QwenImageTransformer2DModel.compile_repeated_blocks = (  # type: ignore[method-assign]
            lambda self, **kw: original(self, **{**kw, "backend": args.backend}))
        torch.compiler.reset()
        results["compiled"] = measure(base.model_copy(update={"compile": True, "warmup": False}), args, folder)
    for mode, r in results.items():
        print(f"{mode}: step {r['step_s_none']:.4f}s without a LoRA, {r['step_s_one_adapter']:.4f}s with one "
              f"(ratio {r['step_ratio']:.3f}; GPU goal <= 1.10); switch {r['switch_ms']:.2f} ms between "
              f"resident sets (GPU goal <= 50 ms), first load {r['first_load_ms']:.1f} ms; "
              f"recompiles after warm-up: {r['recompiles_after_warmup']}")
    if args.json:
        args.json.write_text(json.dumps({"rank": args.rank, "size": args.size, "steps": args.steps,
                                         **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
