"""qwen-image-server: a production HTTP server for the Qwen-Image text-to-image model."""

__version__ = "0.1.0"
