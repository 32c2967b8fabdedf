# syntax=docker/dockerfile:1
# The server's container image (docs/deployment-container.md):
#   docker build -t qwen-image-server .
#   docker run --gpus all -p 5000:5000 -v qwen-cache:/cache -e QWEN_IMAGE_MODEL=Qwen/Qwen-Image qwen-image-server
# BASE is any image with Python 3.10+ (and venv): by default PyTorch's CUDA runtime image, whose
# torch (the version requirements.txt pins) is used as it is, so nothing CUDA is downloaded twice.
# EXTRAS adds pinned requirement files: "ray", "s3", "gpu" (torchao, kernels), "cache" (cache-dit),
# comma- or space-separated. The PIP_* arguments reach pip only while building (a mirror, a folder
# of wheels such as a CPU torch, a CA bundle); none of them stays in the image.
ARG BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

FROM ${BASE} AS deps
ARG EXTRAS=""
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# --system-site-packages: the base's own torch satisfies the torch pin (not downloaded again);
# everything else pinned is installed into the venv, over whatever the base has.
RUN python3 -m venv --system-site-packages /opt/qwen-image
COPY requirements*.txt /src/
RUN set -eu; \
    reqs="-r /src/requirements.txt"; \
    for extra in $(echo "$EXTRAS" | tr ',' ' '); do reqs="$reqs -r /src/requirements-$extra.txt"; done; \
    /opt/qwen-image/bin/python -m pip install $reqs

# The package as a wheel, built apart so that a code change leaves the dependency layers cached.
FROM deps AS wheel
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
COPY pyproject.toml README.md /src/
COPY qwen_image_server /src/qwen_image_server
RUN /opt/qwen-image/bin/python -m pip wheel --no-deps --wheel-dir /wheel /src

FROM ${BASE} AS runtime
# A fixed, unprivileged uid (no clash with a base's uid 1000 user); the folders it writes are its own.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/qwen --shell /usr/sbin/nologin qwen \
    && mkdir -p /cache /srv/qwen-image/outputs /srv/qwen-image/data \
    && chown -R qwen:qwen /cache /srv/qwen-image
COPY --from=deps /opt/qwen-image /opt/qwen-image
COPY --from=wheel /wheel /tmp/wheel
RUN /opt/qwen-image/bin/python -m pip install --no-deps --no-cache-dir --disable-pip-version-check /tmp/wheel/*.whl \
    && rm -rf /tmp/wheel \
    && /opt/qwen-image/bin/qwen-image --help >/dev/null
# Every cache a model run fills lives under /cache (one volume: weights download once, compiled
# kernels are reused); images and the job store under /srv/qwen-image.
ENV PATH=/opt/qwen-image/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    MODELSCOPE_CACHE=/cache/modelscope \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    QWEN_IMAGE_CACHE_DIR=/cache/qwen-image-server \
    QWEN_IMAGE_OUTPUT_DIR=/srv/qwen-image/outputs \
    QWEN_IMAGE_DATA_DIR=/srv/qwen-image/data \
    HOST=0.0.0.0 \
    PORT=5000
VOLUME ["/cache", "/srv/qwen-image/outputs", "/srv/qwen-image/data"]
WORKDIR /srv/qwen-image
USER 10001:10001
EXPOSE 5000
# Liveness only (/health): a loading model is healthy; /ready says when it takes work. The start
# period covers a first download and load of the real model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '5000'), timeout=8)"]
# Every setting is an environment variable (QWEN_IMAGE_*, WORKERS, THREADS, PORT) or a flag:
#   docker run ... qwen-image-server --max-queue 64 --workers auto
ENTRYPOINT ["qwen-image", "serve"]
CMD []
# Last, so that a new revision or date rebuilds no other layer.
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG EXTRAS=""
LABEL org.opencontainers.image.title="qwen-image-server" \
      org.opencontainers.image.description="Production HTTP server for the Qwen-Image text-to-image and image-editing models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.documentation="docs/deployment-container.md" \
      io.github.qwen-image-server.extras="${EXTRAS}"
