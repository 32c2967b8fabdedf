"""The import path serve_config.yaml files written for earlier versions name
(`qwen_image_server.ray_serve:app_builder`); the deployment lives in `launch/ray_app.py`."""

from qwen_image_server.launch.ray_app import app_builder

__all__ = ["app_builder"]
