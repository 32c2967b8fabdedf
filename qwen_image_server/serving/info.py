"""The body of GET /info: the seed's model and device facts, then the scheduler's numbers and limits,
the engines, the options in effect, the defaults and the models served, filled in one place."""

from __future__ import annotations

import dataclasses

from qwen_image_server import __version__
from qwen_image_server.config.presets import ASPECT_RATIOS
from qwen_image_server.engine.device import gpu_memory_mb
from qwen_image_server.protocol.native import (
    EngineInfo,
    EngineOptions,
    GenerationDefaultsInfo,
    GpuMemory,
    InfoResponse,
    ModelInfo,
    RankInfo,
    SchedulerInfo,
)
from qwen_image_server.scheduler import SchedulerConfig, SchedulerStats, SlotState, SlotStats
from qwen_image_server.serving.generation import Generation
from qwen_image_server.serving.metrics import engine_memory


def server_info(generation: Generation, replica: str | None) -> InfoResponse:
    """What /info answers now."""
    settings, device, scheduler = generation.settings, generation.device, generation.scheduler
    registry = generation.models
    model = registry.model
    loaded = {m.name: m for m in registry.models}
    stats = scheduler.stats()
    reports = engine_memory(scheduler)
    if reports is not None:  # engine processes: the first engine's, as of its last batch
        memory = reports[0] if reports else None
    else:
        memory = gpu_memory_mb(device) if model is not None else None
    return InfoResponse(
        model_name=settings.models[0].name,
        model_source=model.source if model else "loading",
        model_loaded=model is not None,
        device=device.type,
        gpu=device.gpu,
        cuda_version=device.cuda_version,
        dtype=str(model.dtype).removeprefix("torch.") if model else None,
        model_load_time=round(model.load_time, 2) if model else None,
        total_parameters=model.total_parameters if model else None,
        model_size_mb=model.size_mb if model else None,
        gpu_memory_mb=memory["allocated"] if memory else None,
        gpu_memory=GpuMemory(**memory) if memory else None,
        supported_aspect_ratios=list(ASPECT_RATIOS),
        aspect_ratios=ASPECT_RATIOS,
        total_requests_processed=stats.processed,
        workers=scheduler.engine_count,
        threads=settings.threads,
        replica=replica,
        scheduler=scheduler_info(stats, scheduler.config),
        engines=[engine_info(slot) for slot in stats.engines],
        options=EngineOptions(**dataclasses.asdict(model.options)) if model else None,
        defaults=GenerationDefaultsInfo(**dataclasses.asdict(generation.defaults)),
        models=[ModelInfo(name=card.id, tasks=card.tasks, pipeline=card.pipeline,
                          max_input_images=card.max_input_images,
                          shared=list(loaded[card.id].shared) if card.id in loaded else [])
                for card in registry.cards()],
        version=__version__,
    )


def scheduler_info(stats: SchedulerStats, config: SchedulerConfig) -> SchedulerInfo:
    """The scheduler's live numbers and its limits, as the wire shows them."""
    mean = stats.mean_inference_time
    return SchedulerInfo.model_validate({
        **dataclasses.asdict(stats), **dataclasses.asdict(config),
        "mean_inference_time": round(mean, 3) if mean is not None else None,
        "batch_wait_ms": config.batch_wait_s * 1000.0,
    })


def engine_info(slot: SlotStats) -> EngineInfo:
    return EngineInfo(index=slot.index, state=slot.state.value, busy=slot.state is SlotState.BUSY,
                      gpu=slot.gpu, pid=slot.pid, batches=slot.batches, restarts=slot.restarts,
                      gpu_memory=GpuMemory(**slot.memory) if slot.memory else None,
                      parallel=slot.parallel,
                      ranks=[RankInfo(rank=r.rank, gpu=r.gpu, pid=r.pid) for r in slot.ranks])
