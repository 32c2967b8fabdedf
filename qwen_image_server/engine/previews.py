"""Previews of an image while it forms: the model's current estimate of the clean image.

For flow matching the transformer predicts a velocity v, and the scheduler steps
x_next = x_t + (sigma_next - sigma_t) * v; the clean estimate at that step is x0 = x_t - sigma_t * v.
The runner records (x_t, v) from the scheduler's own step (after CFG, exactly what the step used),
and turns the rows that asked for a preview into a small RGB picture:

* `latent`: a 16 -> 3 linear projection of x0's channels, one pixel per 8x8 patch, fitted when the
  model loads against the VAE's own decoder (least squares over a few random latents decoded once
  at a small size). A matmul on a (16, H/8, W/8) tensor: next to nothing beside a step.
* `full`: a real VAE decode of x0, as the pipeline decodes the final latents.

The picture leaves the engine as a PIL image on the CPU (picklable, no device memory); encoding it
is the API's business, off the engine thread.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from qwen_image_server.engine.types import Preview, PreviewMode

VAE_SCALE = 8  # pixels per latent pixel
PATCH = 2  # latent pixels per packed token side (2x2 patches of 16 channels = 64)
# The fit: this many random latents of this side (in latent pixels), decoded once.
FIT_SAMPLES, FIT_SIDE = 2, 16


@dataclass(frozen=True)
class LatentProjection:
    """rgb = weight @ z + bias for a normalised latent pixel z (16 channels); rgb in [-1, 1]."""

    weight: torch.Tensor  # (3, channels), float32
    bias: torch.Tensor  # (3,), float32
    # How well it follows the decoder on the latents it was fitted to: the correlation of its
    # colours with the decoded ones, each channel's mean removed (1.0: a perfect fit).
    correlation: float = 0.0

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised latents -> (B, 3, H, W) RGB in [-1, 1] (unclamped)."""
        weight = self.weight.to(latents.device)
        bias = self.bias.to(latents.device)
        return torch.einsum("oc,bchw->bohw", weight, latents.float()) + bias.view(1, 3, 1, 1)


def vae_statistics(vae: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) that turn the pipeline's normalised latents into the VAE's: z * std + mean."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
    return mean, std


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised latents on the pipeline's execution device -> (B, 3, 8H, 8W) in
    [-1, 1], as the pipeline decodes them (offload hooks move the VAE, not its inputs)."""
    z = latents.unsqueeze(2).to(vae.dtype)
    mean, std = vae_statistics(vae, z.device, z.dtype)
    return vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]


def fit_projection(vae: Any, device: torch.device, seed: int = 0) -> LatentProjection:
    """Least-squares fit of latent pixel -> the mean colour of the 8x8 pixels the VAE decodes it to.

    The latents are smooth random fields (noise at a quarter of the side, upsampled), closer to an
    image's latents than white noise, where the decoder's spatial mixing would dominate.
    """
    channels = vae.config.z_dim
    generator = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.randn(FIT_SAMPLES, channels, FIT_SIDE // 4, FIT_SIDE // 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(FIT_SIDE, FIT_SIDE), mode="bilinear",
                                             align_corners=False)
    detail = torch.randn(FIT_SAMPLES, channels, FIT_SIDE, FIT_SIDE, generator=generator)
    latents = (smooth + 0.25 * detail).to(device)
    with torch.inference_mode():
        # An RGBA VAE (Qwen-Image-Layered's) decodes a fourth channel, alpha: the colours are fitted.
        images = decode(vae, latents)[:, :3].float().cpu()
    target = torch.nn.functional.avg_pool2d(images, VAE_SCALE)  # (N, 3, side, side)
    x = latents.float().cpu().permute(0, 2, 3, 1).reshape(-1, channels)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(x1, y).solution  # (channels + 1, 3)
    predicted, actual = x1 @ solution - y.mean(0), y - y.mean(0)
    correlation = float((predicted * actual).sum() / (predicted.norm() * actual.norm()).clamp_min(1e-12))
    return LatentProjection(weight=solution[:channels].T.contiguous(), bias=solution[channels].contiguous(),
                            correlation=correlation)


def latent_grid(tokens: int, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of the packed token grid: height/16 x width/16 when that matches `tokens`;
    otherwise (masked edits size their latents themselves) the factorisation of `tokens`
    nearest the requested aspect ratio."""
    rows, cols = height // (VAE_SCALE * PATCH), width // (VAE_SCALE * PATCH)
    if rows * cols == tokens:
        return rows, cols
    aspect = width / height
    pairs = [(r, tokens // r) for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0]
    pairs += [(c, r) for r, c in pairs]
    return min(pairs, key=lambda rc: abs(math.log(rc[1] / rc[0] / aspect)))


def unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols, C*4) packed tokens -> (B, C, 2*rows, 2*cols) latent pixels (diffusers'
    QwenImagePipeline._unpack_latents, without its frame axis)."""
    batch, _, channels = packed.shape
    x = packed.view(batch, rows, cols, channels // 4, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels // 4, rows * PATCH, cols * PATCH)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images on the CPU."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row) for row in array]


def _synchronize(tensor: torch.Tensor | None) -> None:
    if tensor is not None and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class StepRecorder:
    """Keeps what the scheduler's last `step` was given: the sample x_t and the velocity v."""

    def __init__(self) -> None:
        self.sample: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None
        self.sigma: float = 0.0

    @contextmanager
    def recording(self, scheduler: Any) -> Iterator[None]:
        """While inside, `scheduler.step` also records its inputs (it computes exactly as before)."""
        step = scheduler.step

        def recording_step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
                           *args: Any, **kwargs: Any) -> Any:
            if scheduler.step_index is None:
                scheduler._init_step_index(timestep)
            self.sigma = float(scheduler.sigmas[scheduler.step_index])
            self.sample, self.velocity = sample, model_output
            return step(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = recording_step  # an instance attribute shadows the method for this call
        try:
            yield
        finally:
            del scheduler.step
            self.sample = self.velocity = None

    def clean_estimate(self, rows: Sequence[int]) -> torch.Tensor:
        """x0 = x_t - sigma_t * v of the given batch rows, packed, float32."""
        assert self.sample is not None and self.velocity is not None, "no step recorded"
        index = torch.tensor(list(rows), device=self.sample.device)
        sample = self.sample.index_select(0, index).float()
        velocity = self.velocity.index_select(0, index.to(self.velocity.device)).float()
        return sample - self.sigma * velocity


# VAE module -> its fitted projection (a fit decodes a few latents: about a second on a CPU).
_FITTED: weakref.WeakKeyDictionary[Any, LatentProjection] = weakref.WeakKeyDictionary()


class Previewer:
    """Makes the previews of one model: its VAE, and the projection fitted to it."""

    def __init__(self, vae: Any, projection: LatentProjection) -> None:
        self.vae = vae
        self.projection = projection

    @classmethod
    def for_pipeline(cls, pipeline: Any, device: torch.device) -> Previewer:
        """The previewer of `pipeline`'s VAE, fitted once per VAE: models that share theirs (the
        generation and edit models of a family) share its projection."""
        projection = _FITTED.get(pipeline.vae)
        if projection is None:
            projection = _FITTED[pipeline.vae] = fit_projection(pipeline.vae, device)
        return cls(pipeline.vae, projection)


    def make(self, recorder: StepRecorder, wanted: dict[int, PreviewMode], step: int, total: int,
             width: int, height: int,
             arrange: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[int, Preview]:
        """The previews of the rows in `wanted` (batch row -> mode) at this step; `arrange` turns
        the recorded packed latents into those of one `width` x `height` picture (layers side by
        side) where the call's latents are not already that."""
        previews: dict[int, Preview] = {}
        # The step's kernels may still be running: wait for them first, so a preview's time is
        # its own work (the copy to the CPU would wait for them anyway).
        _synchronize(recorder.sample)
        latent_rows = [row for row, mode in wanted.items() if mode == "latent"]
        if latent_rows:
            start = time.perf_counter()
            images = to_pil(self.projection.apply(self._unpacked(recorder, latent_rows, width, height, arrange)))
            share = (time.perf_counter() - start) / len(latent_rows)
            for row, image in zip(latent_rows, images, strict=True):
                previews[row] = Preview(step, total, "latent", image, share)
        for row in (row for row, mode in wanted.items() if mode == "full"):
            # One decode per row: each job pays for its own preview and no other.
            start = time.perf_counter()
            [image] = to_pil(decode(self.vae, self._unpacked(recorder, [row], width, height, arrange))[:, :3])
            previews[row] = Preview(step, total, "full", image, time.perf_counter() - start)
        return previews

    @staticmethod
    def _unpacked(recorder: StepRecorder, rows: Sequence[int], width: int, height: int,
                  arrange: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        x0 = recorder.clean_estimate(rows)
        if arrange is not None:
            x0 = arrange(x0)
        grid = latent_grid(x0.shape[1], width, height)
        return unpack(x0, *grid)


