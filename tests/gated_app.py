"""An app factory for Gunicorn run by hand in tests: the real app, its engine in a process of its
own, every denoising step of which waits while the file named by QWEN_TEST_GATE exists (see
tests/engine_loaders.py). So a test can hold jobs running and queued, then kill the server.

    QWEN_TEST_GATE=/tmp/gate gunicorn -c gunicorn_config.py 'tests.gated_app:create_app()'
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from qwen_image_server.api.app import create_app as create_real_app
from qwen_image_server.config.checks import engine_gpus
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.process import engine_factories
from tests.engine_loaders import GatedLoader


def create_app() -> FastAPI:
    settings = Settings()
    loader = GatedLoader(Path(os.environ["QWEN_TEST_GATE"]))
    return create_real_app(settings, engines=engine_factories(settings, engine_gpus(settings), loader))
