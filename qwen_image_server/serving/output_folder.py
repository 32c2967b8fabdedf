"""The folder `save_to_file` images go to: its free space, and its upkeep.

Free space: below the floor (QWEN_IMAGE_MIN_FREE_DISK_MB) /ready answers 503 and requests that
ask to save are refused with 507 before any work, while requests that save nothing still run. A
server that kept taking saves onto a full disk would spend GPU time on files it cannot write.

Upkeep (`sweep`, at start and every QWEN_IMAGE_OUTPUT_SWEEP_INTERVAL_S, on the CPU pool): saved
images older than the retention period, or past the byte budget (oldest first), are deleted, and
so are temp files a crashed save left behind. Only names this server writes are touched
(`render.SAVED_NAME`, `render.TEMP_NAME`), and only regular files: whatever else an operator keeps
in the folder stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_image_server import errors
from qwen_image_server.config.settings import Settings
from qwen_image_server.serving.render import SAVED_NAME, TEMP_NAME

log = logging.getLogger(__name__)

MIB = 2**20
# A temp file is a crash's leftover once it is this old: a save writes its temp file within
# seconds, and another process saving into the same folder (a second server, a replica) may be
# writing one right now.
STALE_TEMP_S = 600.0


def free_bytes(folder: Path) -> int | None:
    """Bytes this user may still write on the folder's filesystem; None when that cannot be read.

    A folder that does not exist (yet, or any more: saves create it again) is measured at its
    nearest existing parent, where it will be made."""
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep deleted."""

    images: int = 0
    image_bytes: int = 0
    temps: int = 0


class OutputFolder:
    """The output folder's free-space floor and retention limits."""

    def __init__(self, path: Path, *, min_free_bytes: int = 0, retention_s: float | None = None,
                 max_bytes: int | None = None) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._low = False  # at the last reading: logged when it changes, not at every probe

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputFolder:
        return cls(settings.output_dir, min_free_bytes=settings.min_free_disk_mb * MIB,
                   retention_s=settings.output_retention_s, max_bytes=settings.output_max_bytes)

    # -- free space (blocking: call on a thread) ---------------------------------------------

    def low_on_space(self) -> bool:
        """True when the disk is below the floor. No floor, or a disk whose space cannot be
        read, is never low: saving is then simply tried (and a failure reported)."""
        if not self.min_free_bytes:
            return False
        free = free_bytes(self.path)
        low = free is not None and free < self.min_free_bytes
        if low != self._low:
            self._low = low
            if low:
                log.warning("the output folder %s has %d MiB free, below the %d MiB kept in reserve "
                            "(QWEN_IMAGE_MIN_FREE_DISK_MB): /ready answers 503 and save_to_file requests 507 "
                            "until space is freed", self.path, (free or 0) // MIB, self.min_free_bytes // MIB)
            else:
                log.info("the output folder %s has free space again: saving images", self.path)
        return low

    def check_space(self) -> None:
        """InsufficientStorage (507) when the disk is below the floor."""
        if self.low_on_space():
            raise errors.InsufficientStorage(
                f"The server's output disk has less free space than it keeps in reserve "
                f"({self.min_free_bytes // MIB} MiB, QWEN_IMAGE_MIN_FREE_DISK_MB), so it saves no images now. "
                "Send the request without save_to_file to get the image in the response.")

    # -- upkeep (blocking: call on the CPU pool) ---------------------------------------------

    def sweep(self, now: float | None = None) -> Swept:
        """Delete saved images past the retention limits (oldest first) and stale temp files."""
        now = time.time() if now is None else now
        try:
            with os.scandir(self.path) as entries:
                found = [(entry.name, entry.path) for entry in entries]
        except FileNotFoundError:
            return Swept()
        except OSError as exc:
            log.warning("could not read the output folder %s to sweep it: %s", self.path, exc)
            return Swept()
        limited = self.retention_s is not None or self.max_bytes is not None
        saved: list[tuple[float, int, str]] = []  # (mtime, size, path)
        temps = 0
        for name, path in found:
            is_saved = limited and SAVED_NAME.fullmatch(name) is not None
            if not is_saved and not TEMP_NAME.fullmatch(name):
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:  # deleted meanwhile (by another sweep, or an operator)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if is_saved:
                saved.append((st.st_mtime, st.st_size, path))
            elif now - st.st_mtime > STALE_TEMP_S and _delete(path):
                temps += 1
        doomed = self._past_limits(sorted(saved), now)
        images = image_bytes = 0
        for _, size, path in doomed:
            if _delete(path):
                images += 1
                image_bytes += size
        swept = Swept(images, image_bytes, temps)
        if images or temps:
            log.info("output folder %s: deleted %d saved image(s) (%.1f MiB) past the retention limits "
                     "and %d stale temp file(s)", self.path, images, image_bytes / MIB, temps)
        return swept

    def _past_limits(self, saved: list[tuple[float, int, str]], now: float) -> list[tuple[float, int, str]]:
        """Of the saved images, oldest first, those to delete: older than the retention period,
        then the oldest of the rest until the others fit the byte budget."""
        cut = 0
        if self.retention_s is not None:
            while cut < len(saved) and now - saved[cut][0] > self.retention_s:
                cut += 1
        if self.max_bytes is not None:
            kept = sum(size for _, size, _ in saved[cut:])
            while cut < len(saved) and kept > self.max_bytes:
                kept -= saved[cut][1]
                cut += 1
        return saved[:cut]


def _delete(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False  # another sweep (a second server on the same folder) was first
    except OSError as exc:
        log.warning("could not delete %s from the output folder: %s", path, exc)
        return False
    return True


async def sweep_periodically(folder: OutputFolder, interval_s: float,
                             in_pool: Callable[[Callable[[], Swept]], Awaitable[Swept]]) -> None:
    """Sweep `folder` every `interval_s` (on the CPU pool, through `in_pool`) until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await in_pool(folder.sweep)
        except Exception:  # one failed sweep must not end the upkeep
            log.exception("sweeping the output folder %s failed", folder.path)
