"""An app factory for Gunicorn run by hand in tests: the real app (its engine in a process of its
own), whose engine fails the way a broken GPU does (a CUDA error from inside the pipeline) for
prompts starting with DIE.

    gunicorn -c gunicorn_config.py 'tests.dying_app:create_app()'
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from qwen_image_server.api.app import create_app as create_real_app
from qwen_image_server.config.checks import engine_gpus
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import Engine
from qwen_image_server.engine.process import engine_factories
from qwen_image_server.engine.types import GenerationSpec, StepCallback, StepEvent

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


def load_dying_engine(settings: Settings) -> Engine:
    """The engine processes' loader (runs in each of them)."""
    from qwen_image_server.engine.models import load_engine

    return DyingEngine(load_engine(settings))


def create_app() -> FastAPI:
    settings = Settings()
    return create_real_app(settings, engines=engine_factories(settings, engine_gpus(settings), load_dying_engine))
