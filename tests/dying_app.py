"""An app factory for Gunicorn run by hand in tests: the real app, whose engine fails the way a
broken GPU does (a CUDA error from inside the pipeline) for prompts starting with DIE.

    gunicorn -c gunicorn_config.py 'tests.dying_app:create_app()'
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from qwen_image_server.api.app import create_app as create_real_app
from qwen_image_server.api.app import real_engine_factory
from qwen_image_server.engine.types import GenerationSpec, StepEvent
from qwen_image_server.scheduler import Engine, StepCallback
from qwen_image_server.settings import Settings

DIE = "fail the device"


class DyingEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback):
        def step(event: StepEvent) -> None:
            if any(spec.prompt.startswith(DIE) for spec in specs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            on_step(event)

        return self.engine.run_batch(specs, step)


def create_app() -> FastAPI:
    settings = Settings()
    load = real_engine_factory(settings)
    return create_real_app(settings, engine_factory=lambda: DyingEngine(load()))
