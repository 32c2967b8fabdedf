"""One image on several GPUs: the ranks of one engine, and how they split each denoising step.

An engine of K ranks (QWEN_IMAGE_GPUS_PER_ENGINE=K) is K processes, one per GPU, that load the
same models and run every batch together; rank 0 talks to the front (engine/process.py) and the
others follow it. They join one torch.distributed group (NCCL on GPUs, gloo on the CPU, where the
tests run it) and a gloo group beside it for the small control messages: the command every rank
runs next (`RankGroup.share`) and, at each step, whether the batch stops there (`agree_stop`), so
a cancel stops every rank at the same step.

How a step is split (QWEN_IMAGE_PARALLEL):

* cfg: the conditional and the unconditional transformer passes of classifier-free guidance run
  on two ranks at once, and their noise predictions are exchanged (one all_gather per step).
  Written here as glue around the transformer's forward (`CfgSplit`); a batch without CFG
  (true_cfg_scale 1) has one pass, which both ranks then compute (no speed-up, same image).
* ulysses / ring: diffusers' context parallelism (`ContextParallelConfig`, `enable_parallelism`):
  the image and text sequence is split across the ranks, attention exchanges heads (Ulysses,
  all-to-all) or keys and values (ring). Its "anything" modes split sequences of any length
  unevenly, so no image size or prompt length is refused; a Ulysses degree must divide the
  attention heads (24 on Qwen-Image), else the engine refuses to load, in one line.
* cfg+ulysses: both, on 2 x K/2 ranks.
* auto: cfg for two ranks, ulysses beyond.

Every rank computes the full latents after each step (the step's outputs are gathered), so the
scheduler's step, previews and the VAE decode are the same on each; rank 0's images are the answer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from qwen_image_server.engine.messages import RankPlan
from qwen_image_server.errors import ModelLoadError

if TYPE_CHECKING:
    from qwen_image_server.engine.runner import PipelineEngine

log = logging.getLogger(__name__)

# A collective that waits longer than this means a rank is gone or stuck: it fails rather than hangs
# (the front has noticed a dead rank long before, and a hung batch is the watchdog's).
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# The followers wait on the control group for rank 0's next command as long as the engine is idle.
_IDLE_TIMEOUT = timedelta(days=3650)


class RankGroup:
    """This process's place among the engine's ranks: the control messages and the split."""

    def __init__(self, plan: RankPlan) -> None:
        self.plan = plan
        self.rank = plan.rank
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device_type == "cuda":
            torch.cuda.set_device(0)  # each rank sees its own GPU only (CUDA_VISIBLE_DEVICES)
        else:
            # K ranks share the CPU's cores: without this each would start a thread per core.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.world))
        dist.init_process_group("nccl" if self.device_type == "cuda" else "gloo", init_method=plan.address,
                                rank=plan.rank, world_size=plan.world, timeout=_COLLECTIVE_TIMEOUT)
        self.control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)

    # -- control ------------------------------------------------------------------------------

    def share(self, command: object = None) -> Any:
        """Rank 0's `command`, on every rank (rank 0 passes it; the others receive it)."""
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def agree_stop(self, stop: bool) -> bool:
        """Whether rank 0 says the batch stops at this step (every rank calls it at every step)."""
        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self.control)
        return bool(flag.item())

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    # -- the split ----------------------------------------------------------------------------

    def parallelize(self, runners: Iterable[PipelineEngine]) -> None:
        """Apply this engine's split to every model's transformer."""
        mode = self.plan.mode
        cfg_group: Any = None
        cfg_rank = 0
        context_mesh = None
        if mode == "cfg":
            cfg_group, cfg_rank = dist.group.WORLD, self.rank
        elif mode == "cfg+ulysses":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device_type, (2, 1, self.plan.world // 2),
                                    mesh_dim_names=("cfg", "ring", "ulysses"))
            cfg_group, cfg_rank = mesh["cfg"].get_group(), mesh["cfg"].get_local_rank()
            context_mesh = mesh["ring", "ulysses"]
        seen: set[int] = set()
        for runner in runners:
            transformer = runner.pipeline.transformer
            if id(transformer) in seen:
                continue
            seen.add(id(transformer))
            if mode in ("ulysses", "ring", "cfg+ulysses"):
                degree = self.plan.world // 2 if mode == "cfg+ulysses" else self.plan.world
                self._context_parallel(transformer, mode, degree, context_mesh)
            if cfg_group is not None:
                runner.split = CfgSplit(transformer, cfg_group, cfg_rank)
        log.info("rank %d of %d: %s parallel", self.rank, self.plan.world, mode)

    def _context_parallel(self, transformer: Any, mode: str, degree: int, mesh: Any) -> None:
        from diffusers import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig
        from torch.distributed.device_mesh import init_device_mesh

        heads = int(transformer.config.num_attention_heads)
        if mode == "ring":
            config = ContextParallelConfig(ring_degree=degree, ring_anything=True, mesh=mesh)
        else:
            if heads % degree:
                raise ModelLoadError(
                    f"QWEN_IMAGE_PARALLEL={mode} with QWEN_IMAGE_GPUS_PER_ENGINE={self.plan.world}: the model's "
                    f"{heads} attention heads do not divide by the Ulysses degree {degree}; choose a number of "
                    f"GPUs whose Ulysses degree divides {heads}, or QWEN_IMAGE_PARALLEL=ring.")
            # "anything": image and text sequences of any length are split unevenly where they must be.
            config = ContextParallelConfig(ulysses_degree=degree, ulysses_anything=True, mesh=mesh)
        device = torch.device(self.device_type, 0)
        rank, world = self.rank, self.plan.world

        def resolve(cp: ContextParallelConfig) -> ParallelConfig:
            # diffusers' own resolution assumes an accelerator (it divides by the device count);
            # this is the same with the device and mesh of this rank, which works on the CPU too.
            resolved = ParallelConfig(context_parallel_config=cp)
            grid = cp.mesh or init_device_mesh(self.device_type, cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
            resolved.setup(rank, world, device, mesh=grid)
            transformer._parallel_config = resolved
            return resolved

        transformer._resolve_parallel_config = resolve
        transformer.enable_parallelism(config=config)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class CfgSplit:
    """CFG-parallel glue: rank 0 of the pair runs the conditional pass, rank 1 the unconditional
    one, at the same time, and they exchange the results.

    The pipeline calls the transformer twice per step, conditional first. On rank 0 the first call
    computes and the second only collects the other rank's result; on rank 1 the first call returns
    a placeholder that the second call, which computes, fills in place once the two results are
    exchanged. The pipeline combines the two only after the second call, so it never sees the
    placeholder empty."""

    def __init__(self, transformer: Any, group: Any, rank: int) -> None:
        self.transformer = transformer
        self.group = group
        self.rank = rank  # 0: the conditional pass, 1: the unconditional one
        self.forward: Callable[..., Any] = transformer.forward
        self._calls = 0
        self._held: torch.Tensor | None = None  # this step's first result (computed or placeholder)

    @contextmanager
    def batch(self, use_cfg: bool) -> Iterator[None]:
        """Split the passes of the pipeline call made inside (only with CFG: else one pass, on both)."""
        if not use_cfg:
            yield
            return
        self._calls, self._held = 0, None
        self.transformer.forward = self._split
        try:
            yield
        finally:
            del self.transformer.forward  # the class's forward again
            self._held = None

    def _split(self, *args: Any, **kwargs: Any) -> Any:
        second = self._calls % 2 == 1
        self._calls += 1
        if not second:
            if self.rank == 0:
                out = self.forward(*args, **kwargs)
                self._held = _first(out)
                return out
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            config = self.transformer.config
            width = config.patch_size * config.patch_size * (config.out_channels or config.in_channels)
            self._held = hidden.new_empty(hidden.shape[0], hidden.shape[1], width)
            return _like(kwargs, self._held)
        held = self._held
        assert held is not None, "the conditional pass comes first"
        if self.rank == 1:
            out = self.forward(*args, **kwargs)
            mine = _first(out)
        else:
            mine = held
        parts = [torch.empty_like(mine), torch.empty_like(mine)]
        dist.all_gather(parts, mine.contiguous(), group=self.group)
        if self.rank == 1:
            held.copy_(parts[0])
            return out
        return _like(kwargs, parts[1])


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _like(kwargs: dict[str, Any], tensor: torch.Tensor) -> Any:
    """`tensor` as the transformer returns its output (a tuple with return_dict=False)."""
    if kwargs.get("return_dict", True) is False:
        return (tensor,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=tensor)
