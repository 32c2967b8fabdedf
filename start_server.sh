#!/usr/bin/env bash
# Start the Qwen-Image server (Linux/macOS).
#   bash start_server.sh
#   WORKERS=1 THREADS=4 PORT=5000 bash start_server.sh
# The first run creates .venv with pinned dependencies and builds the embedded tiny model;
# QWEN_IMAGE_MODEL=Qwen/Qwen-Image (or a local folder) serves the real model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/ensure_venv.sh"
exec "$ROOT/.venv/bin/qwen-image" serve "$@"
