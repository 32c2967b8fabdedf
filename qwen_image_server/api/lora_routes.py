"""GET /v1/loras: the LoRAs requests may name, what each fits, and which are loaded now."""

from __future__ import annotations

from fastapi import APIRouter

from qwen_image_server.api.context import Ctx
from qwen_image_server.engine.lora_library import LoraEntry, LoraLibrary
from qwen_image_server.protocol.native import LoraInfo, LoraList

router = APIRouter(prefix="/v1", tags=["loras"])


@router.get("/loras", response_model=LoraList)
async def list_loras(ctx: Ctx) -> LoraList:
    """Every LoRA of QWEN_IMAGE_LORA_DIR and QWEN_IMAGE_LORAS: its rank, the base model it says it
    is for, the loaded models it fits, where it is resident, and whether it is usable."""
    generation = ctx.generation
    library = generation.loras
    models = [model.name for model in generation.models.models]
    entries = list(library.entries().values())
    data = [await generation.in_pool(_info, library, entry, models) for entry in entries]
    return LoraList(data=data, max_per_request=ctx.settings.max_loras_per_request,
                    max_resident=ctx.settings.max_resident_loras)


def _info(library: LoraLibrary, entry: LoraEntry, models: list[str]) -> LoraInfo:
    """One LoRA's row (reads its file's header once; a hub file only once it is downloaded)."""
    facts = library.facts(entry)
    problems = {model: library.problem(entry.name, model) for model in models}
    broken = library.unusable(entry.name) or (facts.problem if facts is not None else None)
    fits = [model for model, problem in problems.items() if problem is None]
    problem = broken or (next(iter(problems.values())) if models and not fits else None)
    location = (entry.location.rsplit("/", 1)[-1] if entry.source == "folder"
                else f"{entry.location}:{entry.weight_name}" if entry.weight_name else entry.location)
    return LoraInfo(
        name=entry.name,
        source=entry.source,
        location=location,
        rank=facts.rank if facts is not None else None,
        base_model=facts.base if facts is not None else None,
        fits=fits,
        lightning_steps=entry.lightning_steps,
        resident=library.resident(entry.name),
        resident_engines=library.resident_engines(entry.name),
        usable=broken is None,
        problem=problem,
    )
