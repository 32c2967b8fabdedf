"""Operator mistakes found before the server starts, each as one line naming the setting: more
engines than GPUs, an output folder that cannot be written, a model folder or a LoRA file that is
not there, a server open to the network."""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

from qwen_image_server.config.lora_refs import missing_path, parse_lora
from qwen_image_server.config.model_list import (
    EMBEDDED,
    LOCAL_FOLDER_ADVICE,
    local_folder_problem,
    looks_local,
)
from qwen_image_server.config.settings import Settings
from qwen_image_server.errors import ConfigurationError

log = logging.getLogger(__name__)

ParallelMode = Literal["cfg", "ulysses", "ring", "cfg+ulysses"]


def visible_gpus(settings: Settings) -> int:
    """GPUs the engines may use (0 when the device setting or the machine has none)."""
    if settings.device in ("cpu", "mps"):
        return 0
    import torch

    # Counted through NVML where it can be: this process must not initialise CUDA before Gunicorn
    # forks the front from it.
    return torch.cuda.device_count()


def engine_gpus(settings: Settings, gpus: int | None = None) -> list[int | None]:
    """The GPU of each engine process, by index among the visible ones (None: no GPU); with
    QWEN_IMAGE_GPUS_PER_ENGINE=K, of each rank: engine i's ranks are entries i*K to i*K+K-1.

    WORKERS=auto is one engine per K visible GPUs (one without GPUs); WORKERS=N asks for N, which on
    GPUs must not exceed their number (two model copies on one GPU run out of memory)."""
    gpus = visible_gpus(settings) if gpus is None else gpus
    k = settings.gpus_per_engine
    check_parallel(settings.parallel, k, settings.attention, settings.cache)
    plural = "s" if gpus != 1 else ""
    if gpus and k > gpus:
        raise ConfigurationError(
            f"QWEN_IMAGE_GPUS_PER_ENGINE={k} asks for {k} GPUs per engine, but this machine has {gpus} GPU{plural} "
            f"visible; set QWEN_IMAGE_GPUS_PER_ENGINE={gpus} or less.")
    if settings.workers == "auto":
        return list(range(gpus // k * k)) if gpus else [None] * k
    if not gpus:
        return [None] * (settings.workers * k)  # the CPU: any number of copies
    if settings.workers * k > gpus:
        if k == 1:
            raise ConfigurationError(
                f"WORKERS={settings.workers} asks for {settings.workers} engines, but this machine has "
                f"{gpus} GPU{plural} visible; set WORKERS={gpus} or WORKERS=auto.")
        raise ConfigurationError(
            f"WORKERS={settings.workers} x QWEN_IMAGE_GPUS_PER_ENGINE={k} asks for {settings.workers * k} GPUs, "
            f"but this machine has {gpus} GPU{plural} visible; set WORKERS={gpus // k} or WORKERS=auto.")
    return list(range(settings.workers * k))


def check_output_dir(settings: Settings) -> None:
    """The folder `save_to_file` images go to exists (it is created) and can be written."""
    folder = settings.output_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigurationError(
            f"QWEN_IMAGE_OUTPUT_DIR={os.fspath(folder)!r} cannot be written ({reason}); choose a "
            "folder this user can write.") from None


def check_local_models(settings: Settings) -> None:
    """Every model given as a folder on this machine is a diffusers pipeline folder. A typo in
    QWEN_IMAGE_MODEL then fails at once, before torch and the pipelines are imported (tens of
    seconds on a GPU machine) rather than after; the loader checks the same again."""
    for ref in settings.models:
        if ref.source in EMBEDDED or not looks_local(ref.source):
            continue
        problem = local_folder_problem(Path(ref.source).expanduser())
        if problem is not None:
            raise ConfigurationError(f"QWEN_IMAGE_MODEL: could not load the model {ref.source!r}: {problem}. "
                                     f"{LOCAL_FOLDER_ADVICE}")


def check_local_lora(settings: Settings) -> None:
    """A QWEN_IMAGE_LORA given as a path is there, and its scale is a number: found at once, as
    for a model folder, rather than once an engine has imported the pipelines (the loader checks
    the same again)."""
    if not settings.lora:
        return
    try:
        spec = parse_lora(settings.lora)
    except ValueError as exc:
        raise ConfigurationError(f"QWEN_IMAGE_LORA={settings.lora!r}: {exc}.") from None
    if (missing := missing_path(spec.source)) is not None:
        raise ConfigurationError(
            f"QWEN_IMAGE_LORA={settings.lora!r}: no such file or folder: {missing.absolute()}; give a .safetensors "
            "file, a folder holding one, or a hub id (owner/name:file.safetensors).")


def warn_missing_lora_dir(settings: Settings) -> None:
    """A QWEN_IMAGE_LORA_DIR that is not a folder is not an error (the folder is read at every
    request, so one mounted later is served), but a typo would otherwise show only as 400
    unknown LoRA on every request that names one."""
    folder = settings.lora_dir
    if folder is not None and not folder.is_dir():
        log.warning("QWEN_IMAGE_LORA_DIR=%s is not a folder (yet): no LoRAs from it until it is",
                    os.fspath(folder))


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name, or "" (every address)
        return False


def warn_if_open(settings: Settings) -> None:
    """One line when anyone on the network may use the server: no API keys and an address other
    than loopback. That is the default (0.0.0.0, no keys, as the seed served), so not an error."""
    if settings.api_keys or settings.api_keys_file or is_loopback(settings.host):
        return
    log.warning("the server is open: no API keys (QWEN_IMAGE_API_KEYS) and it listens on %s:%d, reachable "
                "from the network, so anyone who reaches it can run jobs and fetch images; set "
                "QWEN_IMAGE_API_KEYS, or HOST=127.0.0.1 to serve this machine only",
                settings.host, settings.port)


def resolve_mode(setting: str, ranks: int) -> ParallelMode | None:
    """The split an engine of `ranks` ranks uses for QWEN_IMAGE_PARALLEL=`setting` (None: one rank)."""
    if ranks == 1:
        return None
    if setting == "auto":
        return "cfg" if ranks == 2 else "ulysses"
    return setting  # type: ignore[return-value]  # checked by `check_parallel`


def check_parallel(setting: str, ranks: int, attention: str, cache: str) -> None:
    """The settings' combinations that cannot work, as one line naming them (ConfigurationError)."""
    mode = resolve_mode(setting, ranks)
    if mode is None:
        return
    name = f"QWEN_IMAGE_PARALLEL={setting} with QWEN_IMAGE_GPUS_PER_ENGINE={ranks}"
    if mode == "cfg" and ranks != 2:
        raise ConfigurationError(f"{name}: CFG-parallel splits the two passes of guidance over exactly 2 GPUs; "
                                 "use QWEN_IMAGE_PARALLEL=cfg+ulysses (an even number of GPUs) or ulysses.")
    if mode == "cfg+ulysses" and (ranks % 2 or ranks < 4):
        raise ConfigurationError(f"{name}: cfg+ulysses needs an even number of GPUs, 4 or more "
                                 "(2 for guidance times the Ulysses degree).")
    if mode == "ring" and attention not in RING_BACKENDS:
        raise ConfigurationError(
            f"{name}: ring attention needs an attention backend that returns its log-sum-exp; "
            f"QWEN_IMAGE_ATTENTION={attention} does not. Set QWEN_IMAGE_ATTENTION to one of "
            f"{', '.join(sorted(RING_BACKENDS))}, or use QWEN_IMAGE_PARALLEL=ulysses.")
    if cache != "none":
        raise ConfigurationError(f"{name}: step caching (QWEN_IMAGE_CACHE={cache}) is not supported on an engine of "
                                 "several GPUs; use QWEN_IMAGE_CACHE=none.")


# diffusers' context-parallel attention backends that can return the log-sum-exp ring attention merges with.
RING_BACKENDS = frozenset({"flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub"})
