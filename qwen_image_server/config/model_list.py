"""`QWEN_IMAGE_MODEL`: one or more models, comma-separated, each `source` or `name=source`.

`tiny` stands for the three embedded test models, `tiny` (generation), `tiny-edit` (multi-image
editing) and `tiny-layered` (one picture into RGBA layers), which share their text encoder (and the
first two their VAE) like the real ones do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The embedded test models' names, as QWEN_IMAGE_MODEL gives them (built by engine/tiny.py).
TINY_MODEL_NAME = "tiny"
TINY_EDIT_MODEL_NAME = "tiny-edit"
# The embedded image -> RGBA layers model (QwenImageLayeredPipeline).
TINY_LAYERED_MODEL_NAME = "tiny-layered"
EMBEDDED = (TINY_MODEL_NAME, TINY_EDIT_MODEL_NAME, TINY_LAYERED_MODEL_NAME)
# The embedded ControlNet, served with the embedded generation model unless QWEN_IMAGE_CONTROLNETS says otherwise.
TINY_CONTROLNET_NAME = "tiny-controlnet"
# The embedded inpainting ControlNet (InstantX's ControlNet-Inpainting layout), served beside it.
TINY_INPAINT_CONTROLNET_NAME = "tiny-controlnet-inpaint"

LOCAL_FOLDER_ADVICE = (
    "Point QWEN_IMAGE_MODEL at a folder made by `save_pretrained` or downloaded from "
    "Qwen/Qwen-Image (it holds model_index.json, transformer/, vae/, text_encoder/, "
    "tokenizer/, scheduler/), or use QWEN_IMAGE_MODEL=tiny for the embedded test model."
)


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str  # the public name: requests' `model`, /v1/models' ids
    source: str  # a hub id, a local folder, or one of EMBEDDED


def parse_model_list(value: str) -> list[ModelRef]:
    """'tiny' or 'Qwen/Qwen-Image, edit=./Qwen-Image-Edit-2509' -> the models, in order.

    ValueError (one sentence) for an empty entry, an empty name or source, or a name used twice.
    """
    refs: list[ModelRef] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            raise ValueError("an empty model entry (two commas, or a comma at an end)")
        name, sep, source = (part.strip() for part in entry.partition("="))
        if not sep:
            name, source = entry, entry
        if not name or not source:
            raise ValueError(f"'{entry}' needs a name and a source, as in 'edit=Qwen/Qwen-Image-Edit'")
        if source == TINY_MODEL_NAME and not sep:
            refs += [ModelRef(embedded, embedded) for embedded in EMBEDDED]
        elif source in EMBEDDED and not sep and ModelRef(source, source) in refs:
            continue  # `tiny,tiny-layered`, as written before `tiny` brought all three
        else:
            refs.append(ModelRef(name, source))
    names = [ref.name for ref in refs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"the model name '{name}' is used twice; give one a name with 'name=source'")
    return refs


def looks_local(source: str) -> bool:
    """Whether a model source names a folder on this machine rather than a hub id."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or "\\" in source


def local_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a diffusers pipeline folder, or None."""
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if not (folder / "model_index.json").is_file():
        return f"{folder} has no model_index.json, so it is not a diffusers pipeline folder"
    return None


def parse_controlnets(value: str, models: list[ModelRef]) -> dict[str, tuple[str, ...]]:
    """`QWEN_IMAGE_CONTROLNETS`: comma-separated ControlNets, each `source` (for the first model)
    or `model=source` (for the model of that public name): at most one that follows control
    images and one that inpaints per model (which one inpaints is read from its config when it
    loads: see engine/loader.with_controlnets). '' serves the embedded ControlNets (both kinds)
    with the embedded generation model (when it is served) and nothing else; 'none' serves none.

    ValueError (one sentence) for an empty entry or a model name not in `models`."""
    value = value.strip()
    if value.lower() == "none":
        return {}
    if not value:
        return {ref.name: (TINY_CONTROLNET_NAME, TINY_INPAINT_CONTROLNET_NAME)
                for ref in models if ref.source == TINY_MODEL_NAME}
    names = [ref.name for ref in models]
    found: dict[str, tuple[str, ...]] = {}
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            raise ValueError("an empty ControlNet entry (two commas, or a comma at an end)")
        model, sep, source = (part.strip() for part in entry.partition("="))
        if not sep:
            model, source = names[0], entry
        if model not in names:
            raise ValueError(f"'{entry}' names the model '{model}', which QWEN_IMAGE_MODEL does not serve "
                             f"({', '.join(names)})")
        if not source:
            raise ValueError(f"'{entry}' needs a source, as in 'Qwen/Qwen-Image=InstantX/Qwen-Image-ControlNet-Union'")
        found[model] = (*found.get(model, ()), source)
    return found
