# Unified-IO (the `uio` command and its HTTP server) in a container, on the CPU by default.
#
#   docker build -t unified-io .
#   docker run --rm -v uio-cache:/cache unified-io uio demo
#
# CUDA variant: torch's CUDA build, which is what PyPI serves for Linux (it brings CUDA's libraries
# as wheels; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit):
#
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t unified-io:cuda .
#   docker run --rm --gpus all -v uio-cache:/cache unified-io:cuda uio demo
#
# Weights and the vocabulary are downloaded on first use into the /cache volume (UIO_HOME).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
# download.pytorch.org's CPU wheel (~190 MB) needs no CUDA; PyPI's Linux wheel is a CUDA build (~500 MB,
# and 16 CUDA library wheels with it). PyPI stays an extra index for torch's own dependencies.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/uio/bin:$PATH \
    UIO_HOME=/cache \
    TORCH_EXTENSIONS_DIR=/opt/uio-kernels \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# g++ builds uio's CPU kernels (below).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 uio \
    && python -m venv /opt/uio \
    && mkdir /cache && chown uio:uio /cache

RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple "torch==$TORCH_VERSION"

COPY pyproject.toml README.md /src/
COPY src /src/src
# The serve extra brings the HTTP server's dependencies (`uio serve`).
RUN pip install "/src[serve]" && rm -rf /src

# Build uio's CPU kernels now (wait=True: here, not in a background process), so that no container
# compiles them when it starts: they are kept in $TORCH_EXTENSIONS_DIR, in a folder named by the
# compiler among other things, so the compiler stays (without one uio does not use the kernels). The
# folder belongs to the user because every load takes the build's lock file there.
RUN python -c "import sys; from uio.accel import cpu_kernels as k; \
sys.exit(0 if k.load(wait=True) or k.unsupported_reason() else f'uio CPU kernels: {k.failure()}')" \
    && mkdir -p "$TORCH_EXTENSIONS_DIR" && chown -R uio:uio "$TORCH_EXTENSIONS_DIR"

USER uio
WORKDIR /home/uio
VOLUME /cache
EXPOSE 8000
CMD ["uio", "--help"]
