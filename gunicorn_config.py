"""Gunicorn configuration, for running Gunicorn by hand:

    gunicorn -c gunicorn_config.py 'qwen_image_server.api.app:create_app()'

`qwen-image serve` (what start_server.sh runs) applies the same options itself. Every value
comes from the server's settings (WORKERS, PORT, HOST, QWEN_IMAGE_*), so both ways agree.
"""

from qwen_image_server.config.settings import Settings
from qwen_image_server.launch.http import gunicorn_options

globals().update(gunicorn_options(Settings()))
