"""A LoRA whose alpha differs from its rank (Qwen-Image-2512's Lightning LoRA stores alpha 8 with
rank 64) is applied at alpha / rank, in every file layout the loader accepts, on both of the
server's ways of applying LoRAs (PEFT adapters; hot-swap slots under compile), against a
reference computed by hand: W x + b + (alpha / rank) B A x."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_image_server.engine.adapters import ResidentAdapters, _slot_state_dict
from qwen_image_server.engine.lora_library import LoraLibrary
from qwen_image_server.engine.tiny import build_lora, ensure_tiny_model
from tests.conftest import tiny_settings

RANK, ALPHA = 8, 2  # alpha / rank = 0.25: a loader that ignores alpha is off by 4x
LAYER = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny pipeline, and one LoRA (alpha 2, rank 8) written in each layout."""
    from diffusers import QwenImagePipeline

    tmp = tmp_path_factory.mktemp("alpha")
    pipeline = QwenImagePipeline.from_pretrained(ensure_tiny_model(tiny_settings(tmp).cache_dir))
    folder = tmp / "loras"
    peft = build_lora(folder / "diffusers.safetensors", pipeline.transformer, base="Qwen-Image", rank=RANK,
                      alpha=ALPHA, seed=3)
    with safe_open(str(peft), framework="pt") as f:
        weights = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - a safetensors file
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == ALPHA
    modules = sorted({key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in weights})
    # The Lightning layout: PEFT key names without metadata, the alpha as a tensor per layer.
    lightning = {}
    # kohya / ComfyUI: lora_unet_ names with underscores, lora_down / lora_up, and an alpha tensor.
    kohya = {}
    for module in modules:
        down, up = weights[f"transformer.{module}.lora_A.weight"], weights[f"transformer.{module}.lora_B.weight"]
        lightning |= {f"diffusion_model.{module}.lora_A.weight": down, f"diffusion_model.{module}.lora_B.weight": up,
                      f"diffusion_model.{module}.alpha": torch.tensor(float(ALPHA))}
        flat = "lora_unet_" + module.replace(".", "_")
        kohya |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                  f"{flat}.alpha": torch.tensor(float(ALPHA))}
    save_file(lightning, str(folder / "lightning.safetensors"))
    save_file(kohya, str(folder / "kohya.safetensors"))
    reference = (weights[f"transformer.{LAYER}.lora_A.weight"], weights[f"transformer.{LAYER}.lora_B.weight"])
    return pipeline, folder, tmp, reference


def by_hand(pipeline, reference, x: torch.Tensor, scale: float) -> torch.Tensor:
    """The layer's output with the LoRA at `scale`, from its plain weights: W x + b + s (alpha/rank) B A x."""
    down, up = reference
    layer = pipeline.transformer.transformer_blocks[0].attn.to_q
    weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
    bias = layer.base_layer.bias if hasattr(layer, "base_layer") else layer.bias
    return x @ weight.T + bias + scale * (ALPHA / RANK) * (x @ down.T @ up.T)


@pytest.mark.parametrize("layout", ["diffusers", "lightning", "kohya"])
def test_eager_adapters_apply_alpha_over_rank(made, layout):
    pipeline, folder, tmp, reference = made
    library = LoraLibrary.from_settings(tiny_settings(tmp, lora_dir=folder))
    adapters = ResidentAdapters(pipeline, library, "tiny", "generate", max_resident=4)
    x = torch.randn(3, pipeline.transformer.transformer_blocks[0].attn.to_q.in_features,
                    generator=torch.Generator().manual_seed(0))
    try:
        adapters.activate(((layout, 0.5),))
        layer = pipeline.transformer.transformer_blocks[0].attn.to_q  # PEFT's wrapper, once loaded
        with torch.no_grad():
            got, want = layer(x), by_hand(pipeline, reference, x, 0.5)
            plain = by_hand(pipeline, reference, x, 0.0)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert (want - plain).abs().max() > 1e-3  # the LoRA does change the layer
    finally:
        adapters.activate(())
        pipeline.delete_adapters(pipeline.get_list_adapters()["transformer"])


@pytest.mark.parametrize("layout", ["diffusers", "lightning", "kohya"])
def test_hot_swap_slots_fold_alpha_over_rank_into_the_weights(made, layout):
    pipeline, folder, _, reference = made
    state = _slot_state_dict(pipeline, folder / f"{layout}.safetensors")
    down = state[f"transformer.{LAYER}.lora_A.weight"]
    up = state[f"transformer.{LAYER}.lora_B.weight"]
    # A slot's own scaling is 1: the product of its weights is the whole update.
    assert torch.allclose(up @ down, (ALPHA / RANK) * (reference[1] @ reference[0]), atol=1e-6)
