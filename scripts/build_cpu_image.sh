#!/usr/bin/env bash
# Build the Dockerfile into a CPU image with buildah, without a registry: a Debian base made by
# debootstrap (with Python 3.11 and venv), imported as a local image, and the CPU build of the
# pinned torch from a folder of wheels. Used by tests/container/test_image.py; also a way to try
# the image on a machine without Docker (run as root).
#   bash scripts/build_cpu_image.sh [TAG]          # default TAG: localhost/qwen-image-server:cpu
# Environment:
#   CONTAINER_WORK   work folder for the base's root file system and the wheel (default
#                    /var/tmp/qwen-image-container)
#   DEBIAN_MIRROR    where debootstrap fetches Debian (default http://deb.debian.org/debian)
#   EXTRAS           passed on as the build argument (e.g. "cache")
# Prints the build time and the image size; exits non-zero when anything fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${1:-localhost/qwen-image-server:cpu}"
WORK="${CONTAINER_WORK:-/var/tmp/qwen-image-container}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE="localhost/qwen-image-base:bookworm"
mkdir -p "$WORK"

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

# 1. The base: Debian 12 (its Python 3.11 fits the CPU torch wheel), built once and kept.
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "making $BASE with debootstrap" >&2
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
  ctr="$(buildah from scratch)"
  buildah add "$ctr" "$WORK/rootfs.tar" / >/dev/null
  buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --rm "$ctr" "$BASE" >/dev/null
  rm -rf "$WORK/rootfs" "$WORK/rootfs.tar"
fi

# 2. The CPU torch that requirements.txt pins, as a wheel in a folder the build mounts. pip's own
#    configuration on this machine says where such a wheel lies (a find-links folder or an index).
torch_pin="$(grep -E '^torch==' "$ROOT/requirements.txt" | cut -d' ' -f1)"
mkdir -p "$WORK/wheels"
if ! ls "$WORK/wheels"/torch-"${torch_pin#torch==}"+cpu-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
    -d "$WORK/wheels" "$torch_pin"
fi
if ! ls "$WORK/wheels"/torch-"${torch_pin#torch==}"+cpu-*.whl >/dev/null 2>&1; then
  echo "error: no CPU wheel of $torch_pin could be had (got: $(ls "$WORK/wheels"))" >&2
  exit 1
fi

# 3. The build: buildah's chroot isolation (no daemon, no user namespaces), the docker format
#    (OCI has no HEALTHCHECK). Local package indexes and the machine's CA bundle are mounted into
#    the RUN steps, and named by the PIP_* build arguments.
args=(--build-arg "BASE=$BASE" --build-arg "PIP_FIND_LINKS=/wheels" --volume "$WORK/wheels:/wheels:ro")
extra_index=()
for index in /opt/pypi /opt/pypi-more; do  # this workplace's local mirrors of PyPI, where present
  if [ -d "$index/simple" ]; then
    args+=(--volume "$index:$index:ro")
    extra_index+=("file://$index/simple")
  fi
done
[ ${#extra_index[@]} -gt 0 ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra_index[*]}")
ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "$ca" ]; then
  args+=(--volume "$ca:/run/host-ca.crt:ro" --build-arg "PIP_CERT=/run/host-ca.crt")
fi
[ -n "${EXTRAS:-}" ] && args+=(--build-arg "EXTRAS=$EXTRAS")
revision="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)"
start=$(date +%s)
buildah bud --isolation chroot --format docker --layers \
  --build-arg "REVISION=$revision" --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "${args[@]}" -t "$TAG" -f "$ROOT/Dockerfile" "$ROOT"
seconds=$(( $(date +%s) - start ))
size="$(buildah images --noheading --format '{{.Size}}' "$TAG" | head -1)"
echo "built $TAG in ${seconds}s; image size $size"
