# comfy-embed: the serverless API in one image (CPU and GPU: torch's wheels
# carry their own CUDA libraries; a GPU host needs only the NVIDIA container
# toolkit). Models, inputs, outputs and the task log live under /data, a
# volume (a NAS / ReadWriteMany mount when several instances share work).
#
#   podman build -t comfy-embed .        # or docker build
#   podman run -p 9000:9000 -v "$PWD/data:/data" comfy-embed
#
# Layers go from least to most often changed: base and Python, the pinned
# dependencies (only pyproject.toml invalidates them), ComfyUI, then the code.

# Any Debian/Ubuntu-like base: python:3.11-slim-bookworm (default), a CUDA
# runtime image, or a local debian:bookworm (scripts/image-check).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# A bare Debian base has no Python: take the distribution's (3.11 on bookworm).
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

ARG UID=1000
RUN useradd --uid "${UID}" --create-home --home-dir /home/comfy --shell /usr/sbin/nologin comfy \
    && mkdir -p /data && chown comfy:comfy /data \
    && python3 -m venv /opt/venv

# Package sources for the download steps only, as build arguments (not baked
# into the image's environment): a private index or local wheel folders
# (mounted with `build -v`), and PIP_CERT, a CA bundle for a TLS proxy.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""
# pip extras of comfy-embed: "torch" (default), "torch,s3"; "" keeps a base's torch.
ARG EXTRAS=torch

WORKDIR /app
# Dependencies from pyproject.toml alone (a stub package stands in for the
# code, with the files its metadata names: the version module, README,
# LICENSE), so that editing the code does not reinstall torch.
COPY pyproject.toml ./
RUN mkdir comfy_embed && touch comfy_embed/__init__.py README.md LICENSE \
    && echo '__version__ = "0"' > comfy_embed/version.py \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ".[${EXTRAS}]" \
    && /opt/venv/bin/pip uninstall -y -q comfy-embed \
    && rm -rf comfy_embed README.md LICENSE build ./*.egg-info

# Extra packages, e.g. what baked-in custom nodes need (see deploy/README.md).
ARG EXTRA_PIP=""
RUN if [ -n "${EXTRA_PIP}" ]; then \
      /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ${EXTRA_PIP}; \
    fi

# Custom-node packs from a lock file (README "Lock file"), in layers of their
# own below ComfyUI and the code: a changed lock re-runs only these, the torch
# layer above is reused. LOCK is a path in the build context (deploy/locks/ is
# in it); the default names nothing. Packs go to /app/custom_nodes at their
# commits, their pinned requirements into the venv, all or nothing (the tool
# runs from its own package, copied alone, so a code change does not rerun
# it). APT_PACKAGES: system libraries packs need (libgl1 for opencv-python).
# Git is installed only when the lock names packs.
ARG LOCK=deploy/locks/empty.lock
ARG APT_PACKAGES=""
COPY comfy_embed/environment /opt/lock-tool/comfy_embed/environment
COPY comfy_embed/config /opt/lock-tool/comfy_embed/config
COPY comfy_embed/errors.py comfy_embed/version.py /opt/lock-tool/comfy_embed/
COPY ${LOCK} /app/comfy-embed.lock
RUN set -e; mkdir -p /app/custom_nodes; touch /opt/lock-tool/comfy_embed/__init__.py; \
    if grep -q '^\[\[packs\]\]' /app/comfy-embed.lock || [ -n "${APT_PACKAGES}" ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git ca-certificates ${APT_PACKAGES} \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    PIP_NO_CACHE_DIR=1 PYTHONPATH=/opt/lock-tool /opt/venv/bin/python -m comfy_embed.environment \
      /app/comfy-embed.lock /app/custom_nodes; \
    rm -rf /opt/lock-tool; \
    /opt/venv/bin/python -m compileall -q /app/custom_nodes >/dev/null || true

# The vendored ComfyUI (checked-out submodule), then comfy-embed itself; the
# code runs from /app (not pip-installed), so vendor/ComfyUI sits beside it.
# (Byte-compiled at build time: /app is read-only for the server's user.)
COPY vendor/ComfyUI /app/vendor/ComfyUI
RUN /opt/venv/bin/python -m compileall -q /app/vendor/ComfyUI >/dev/null || true
COPY comfy_embed /app/comfy_embed
COPY server.py pyproject.toml README.md /app/
RUN /opt/venv/bin/python -m compileall -q /app/comfy_embed

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/comfy \
    FC_SERVER_PORT=9000 \
    COMFY_EMBED_COMFYUI_DIR=/app/vendor/ComfyUI \
    COMFY_EMBED_BASE_DIR=/data \
    COMFY_EMBED_LOCK=/app/comfy-embed.lock \
    COMFY_EMBED_CUSTOM_NODES_DIRS=/app/custom_nodes

USER comfy
VOLUME ["/data"]
EXPOSE 9000

# Liveness without curl: the image's own Python asks /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; p = os.environ.get('COMFY_EMBED_PORT') or os.environ.get('FC_SERVER_PORT') or '9000'; u.urlopen('http://127.0.0.1:%s/health' % p, timeout=4)"]

CMD ["python", "server.py"]
