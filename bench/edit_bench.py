#!/usr/bin/env python3
"""Edit benchmark: one edit through HTTP (`POST /edit`, multipart) against the raw pipeline call.

Prints, from one run on this machine (any edit model: QWEN_IMAGE_MODEL as for the server, default
the embedded tiny models), the median of interleaved repeats of
  raw:  the edit model's diffusers pipeline called directly with the decoded image
  http: the same edit through the server: upload, decode on the CPU pool, queue, pipeline, PNG
and their ratio (goal <= 1.05: the server adds at most 5% around the pipeline).

    .venv/bin/python bench/edit_bench.py [--steps 20] [--size 512] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scheduler_bench import serve

from qwen_image_server.config.settings import Settings
from qwen_image_server.launch.http import find_fastapi

PROMPT = "make it a night scene with a full moon"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="input and output side, pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    settings = Settings(log_level="warning", output_dir=Path("bench/results/tmp"))
    server, thread, url = serve(settings)
    ctx = find_fastapi(server.config.loaded_app).state.ctx
    edit_model = next(m for m in ctx.generation.models.models if m.task == "edit")
    pipeline = edit_model.pipeline
    side = args.size
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    upload = buf.getvalue()
    client = httpx.Client(base_url=url, timeout=3600)
    form = {"prompt": PROMPT, "num_inference_steps": str(args.steps), "add_overlay": "false",
            "seed": "7", "size": f"{side}x{side}", "model": edit_model.name}

    def raw_once() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            pipeline(prompt=PROMPT, negative_prompt=" ", image=[picture], width=side, height=side,
                     num_inference_steps=args.steps, true_cfg_scale=4.0,
                     generator=torch.Generator("cpu").manual_seed(7), output_type="pil")
        return time.perf_counter() - start

    def http_once() -> float:
        start = time.perf_counter()
        client.post("/edit", data=form, files=[("image", ("photo.png", upload, "image/png"))]).raise_for_status()
        return time.perf_counter() - start

    # Warm-up; the raw calls run on this thread while the server's engine thread waits for work.
    http_once()
    raw_once()
    raw, e2e = [], []
    for _ in range(args.repeats):  # interleaved so drift affects both alike
        raw.append(raw_once())
        e2e.append(http_once())
    raw_med, e2e_med = statistics.median(raw), statistics.median(e2e)
    result = {
        "device": ctx.device.label,
        "model": edit_model.name,
        "pipeline": edit_model.pipeline_class,
        "steps": args.steps,
        "size": side,
        "raw_s": round(raw_med, 3),
        "http_s": round(e2e_med, 3),
        "ratio": round(e2e_med / raw_med, 3),
    }
    print(f"edit {side}x{side}, {args.steps} steps on {result['device']} ({result['pipeline']}): "
          f"raw {raw_med:.2f}s, through HTTP {e2e_med:.2f}s, ratio {result['ratio']:.3f} (goal <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    server.should_exit = True
    thread.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
