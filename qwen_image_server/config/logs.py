"""Logging setup shared by the server and the CLI."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Log to stderr at `level` unless the host (Gunicorn, pytest) already configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level.upper(), format=FORMAT)
    logging.getLogger("qwen_image_server").setLevel(level.upper())
    # Model libraries are chatty at INFO; their warnings still show.
    for noisy in ("diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
