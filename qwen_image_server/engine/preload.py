"""What an engine process imports before it loads a model, imported once by the fork server the
engine processes start from (`engine/process.py`).

An engine then starts in the time of its model load, not that plus the seconds of importing
torch, diffusers, transformers and peft: the second of WORKERS engines, and every engine restart.

Importing this module must never initialise CUDA: a process forked from a parent with a CUDA
context cannot use CUDA, and each engine must pin its own GPU (CUDA_VISIBLE_DEVICES) before CUDA
starts. Imports only, then; `tests/test_engine_process.py` checks it with CUDA made to look present.
"""

from __future__ import annotations

import torch  # noqa: F401
from diffusers import (  # noqa: F401 - the pipelines and their components, as from_pretrained imports them
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer  # noqa: F401

import qwen_image_server.engine.models  # noqa: F401 - the engine itself (loader, runner, adapters)
