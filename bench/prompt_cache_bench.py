#!/usr/bin/env python3
"""Prompt cache benchmark: what the prompt cache saves per image, engine-level.

Loads the model twice in this process (QWEN_IMAGE_MODEL as for the server, default the embedded
tiny model), once with the prompt cache (QWEN_IMAGE_PROMPT_CACHE_MB default) and once without
(0), and generates the same images on both, interleaved: a prompt that repeats (n>1, retries,
the same request again) with the default negative prompt and CFG on. Prints the median seconds
per image of each, the text encoder's own time per prompt, and the ratio cached / uncached
(below 1: the cache saves time). The first image of each engine warms it up and is not counted.

    .venv/bin/python bench/prompt_cache_bench.py [--size 256] [--steps 4] [--repeats 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_image_server.config.presets import DEFAULT_NEGATIVE_PROMPT
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.models import ModelSet, load_engine
from qwen_image_server.engine.types import GenerationSpec

PROMPT = "a lighthouse on a rocky coast at dusk, oil painting, warm light, seagulls"


def one_image(engine: ModelSet, size: int, steps: int, seed: int) -> float:
    spec = GenerationSpec(prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, width=size, height=size,
                          num_inference_steps=steps, true_cfg_scale=4.0, seed=seed)
    start = time.perf_counter()
    engine.run_batch([spec], lambda event: None)
    return time.perf_counter() - start


def encoder_seconds(engine: ModelSet, repeats: int) -> float:
    """The text encoder's time for the prompt alone (median), what a hit skips."""
    runner = engine.first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            runner._encode(PROMPT)
            runner._encode(DEFAULT_NEGATIVE_PROMPT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = Settings(_env_file=None, log_level="warning")
    engines = {"cached": load_engine(base.model_copy(update={"prompt_cache_mb": 256.0})),
               "uncached": load_engine(base.model_copy(update={"prompt_cache_mb": 0.0}))}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        one_image(engine, args.size, args.steps, seed=0)  # warm-up (and the cache's first miss)
    for i in range(args.repeats):
        for name, engine in engines.items():
            times[name].append(one_image(engine, args.size, args.steps, seed=i + 1))
    cached, uncached = (statistics.median(times[n]) for n in ("cached", "uncached"))
    encoder = encoder_seconds(engines["uncached"], args.repeats)
    result = {
        "model": base.model, "size": args.size, "steps": args.steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cached_s_per_image": round(cached, 4), "uncached_s_per_image": round(uncached, 4),
        "encoder_s_per_image": round(encoder, 4), "saved_s_per_image": round(uncached - cached, 4),
        "ratio_cached_to_uncached": round(cached / uncached, 3),
        "hits": engines["cached"].prompt_cache_stats().hits,
    }
    for key, value in result.items():
        print(f"{key:28} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
