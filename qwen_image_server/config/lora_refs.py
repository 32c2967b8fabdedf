"""LoRA references as the operator and requests write them, parsed without loading anything:
`QWEN_IMAGE_LORA` ('<path or hub id>[:file][,scale]'), `QWEN_IMAGE_LORAS` ('name=owner/repo:file'),
the names requests give (`loras[].name`), and a Lightning LoRA's step count from its file name.

The engine loads and fuses them (`engine/lora.py`, `engine/adapters.py`); settings, startup
checks and the wire models only need these rules, and none of the model libraries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A LoRA's name: a file stem or a name given in QWEN_IMAGE_LORAS; never a path.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)

# lightx2v/Qwen-Image-Lightning files are named "...-Lightning-8steps-V1.1...safetensors".
_LIGHTNING = re.compile(r"lightning[-_]?(\d+)[-_]?steps?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """Where the LoRA is and how strongly it is fused."""

    source: str  # a local file or folder, or a hub repo id
    weight_name: str | None  # the file inside a hub repo or folder, when it holds several
    scale: float
    lightning_steps: int | None  # set for a Lightning (step-distilled) LoRA

    @property
    def label(self) -> str:
        return f"{self.source}:{self.weight_name}" if self.weight_name else self.source


def parse_lora(text: str) -> LoraSpec:
    """'<path or hub id>[:file.safetensors][,scale]' -> LoraSpec; ValueError names the problem."""
    source, _, scale_text = text.strip().partition(",")
    source = source.strip()
    try:
        scale = float(scale_text) if scale_text.strip() else 1.0
    except ValueError:
        raise ValueError(f"the LoRA scale {scale_text.strip()!r} is not a number") from None
    if not source:
        raise ValueError("no LoRA path or hub id before the comma")
    weight_name = None
    local = Path(source).expanduser()
    if not local.exists() and ":" in source and not re.match(r"^[A-Za-z]:[\\/]", source):
        source, weight_name = source.split(":", 1)  # hub form: repo/id:file.safetensors
    return LoraSpec(source, weight_name, scale, lightning_steps_of(weight_name or source))


def lightning_steps_of(file_name: str) -> int | None:
    """The step count a Lightning LoRA was distilled for, read from its file name."""
    match = _LIGHTNING.search(file_name)
    return int(match.group(1)) if match else None


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id (hub ids are 'owner/name', never absolute or dotted)."""
    return text.startswith((".", "/", "~", "\\")) or text.endswith(".safetensors") or bool(
        re.match(r"^[A-Za-z]:[\\/]", text))


def missing_path(source: str) -> Path | None:
    """The local path `source` names when it looks like a path that is not there (else None: a
    file or folder that exists, or a hub id)."""
    local = Path(source).expanduser()
    return local if looks_like_path(source) and not local.exists() else None


_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # a hub repo id: owner/name


def is_valid_name(name: str) -> bool:
    return bool(_NAME.match(name)) and ".." not in name


def parse_hub_loras(text: str) -> dict[str, tuple[str, str | None]]:
    """'name=owner/repo:file.safetensors,...' -> {name: (repo, file)}; ValueError names the part."""
    out: dict[str, tuple[str, str | None]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, source = part.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not source:
            raise ValueError(f"{part!r} is not 'name=owner/repo:file.safetensors'")
        if not is_valid_name(name):
            raise ValueError(f"the LoRA name {name!r} may hold only letters, digits, '.', '_' and '-'")
        if name in out:
            raise ValueError(f"the LoRA name {name!r} is given twice")
        repo, _, weight_name = source.partition(":")
        if not _REPO.match(repo):
            raise ValueError(f"{source!r} is not a hub repo id 'owner/repo' (local files go in QWEN_IMAGE_LORA_DIR)")
        out[name] = (repo, weight_name or None)
    return out


