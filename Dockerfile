# Two images serving the bundled default model on CPU:
#   full (the default target): torch inside: serves .pt checkpoints (exported for ONNX Runtime on first start), CUDA
#     docker build -t captioner . && docker run -p 8000:8000 captioner
#     another model: docker run -p 8000:8000 -v /models:/models -e CAPTIONER_CHECKPOINT=/models/best.pt captioner
#   slim: no torch, a fraction of the size, int8 decoder weights: serves ONNX export folders (captioner export ...)
#     docker build --target slim -t captioner:slim . && docker run -p 8000:8000 captioner:slim
#     another model: docker run -p 8000:8000 -v /models:/models -e CAPTIONER_CHECKPOINT=/models/best-onnx captioner:slim
# Offline/air-gapped builds: override BASE_IMAGE (a local Debian + python3 image) and the indexes.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS full

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_EXTRA_INDEX_URL=""
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
# A CA bundle inside the base image for pip to trust (networks behind a TLS-inspecting proxy).
ARG PIP_CERT_FILE=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (layer caching): torch from its index (CPU wheels by default), then the rest
# from pyproject.toml with the project's own packages as empty stand-ins. What building the project's
# metadata reads comes in for real: pyproject.toml, the README (its long description) and the version
# file (a version bump is a new package anyway). tests/test_dockerfile.py replays this step as written.
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && if [ -n "$TORCH_EXTRA_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_EXTRA_INDEX_URL"; fi \
    && pip install --index-url "$TORCH_INDEX_URL" $TORCH_SPEC
COPY pyproject.toml README.md ./
COPY captioner/_version.py ./captioner/
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && mkdir -p training service \
    && touch captioner/__init__.py training/__init__.py service/__init__.py \
    && pip install --index-url "$PIP_INDEX_URL" ".[serve]" \
    && pip uninstall -y captioner \
    && rm -rf build captioner.egg-info captioner training service

COPY captioner ./captioner
COPY training ./training
COPY service ./service
# The bundled model's ONNX export, made and checked against PyTorch once, at build time: on CPU the
# service runs it on ONNX Runtime (CAPTIONER_BACKEND=auto), and finds it here instead of exporting
# at every start. A mounted checkpoint is exported on its first start into this cache (when writable)
# or ahead of time: captioner export /models/best.pt /models/best-onnx --format onnx.
ENV CAPTIONER_CACHE_DIR=/opt/captioner-cache
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && pip install --no-deps --index-url "$PIP_INDEX_URL" . \
    && python3 -c "from captioner import Captioner; Captioner.from_checkpoint(None, backend='onnxruntime')" \
    && useradd --create-home --uid 10001 captioner \
    && chown -R captioner "$CAPTIONER_CACHE_DIR"
USER captioner

ENV CAPTIONER_DEVICE=cpu CAPTIONER_BACKEND=auto
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
CMD ["captioner-serve", "--host", "0.0.0.0", "--port", "8000"]


# The bundled model's export as a folder of its own, for the slim image (made with torch, in the full image).
FROM full AS export
# the label lets scripts/docker-smoke.sh remove this stage's image after a build: left untagged, it would keep a
# replaced full image's layers (6 GB) alive
LABEL captioner.stage=export
# Its decoder's weights in int8 (a decoding step about 3x faster; on Flickr8k test 974 of 1,000 beam-3 captions are the
# fp32 export's and CIDEr moves by +0.0006): --build-arg SLIM_QUANTIZE= for the fp32 export, the full image's captions.
ARG SLIM_QUANTIZE=int8-decoder
RUN captioner export default /tmp/default-onnx --format onnx ${SLIM_QUANTIZE:+--quantize "$SLIM_QUANTIZE"}

FROM ${BASE_IMAGE} AS slim

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT_FILE=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The runtime's dependencies (numpy, ONNX Runtime, the web service; no torch), with stand-ins as in the full image.
COPY pyproject.toml README.md ./
COPY captioner/_version.py ./captioner/
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && mkdir -p training service \
    && touch captioner/__init__.py training/__init__.py service/__init__.py \
    && pip install --index-url "$PIP_INDEX_URL" ".[runtime]" \
    && pip uninstall -y captioner \
    && rm -rf build captioner.egg-info captioner training service

COPY captioner ./captioner
COPY training ./training
COPY service ./service
COPY --from=export /tmp/default-onnx /opt/captioner-model
# CAPTIONER_DEFAULT_MODEL: the export stands in for the bundled .pt (which needs torch to read) wherever the default
# model is meant. Installed, the sources and the package's copy of the .pt go (nothing here can read it); the build
# then checks that torch is absent and that the model loads.
ENV CAPTIONER_DEFAULT_MODEL=/opt/captioner-model
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && pip install --no-deps --index-url "$PIP_INDEX_URL" . \
    && rm -rf captioner training service /opt/venv/lib/python3*/site-packages/captioner/assets/default.pt \
    && python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python3 -c "from captioner.loading import load_captioner; load_captioner()" \
    && useradd --create-home --uid 10001 captioner
USER captioner

ENV CAPTIONER_DEVICE=cpu CAPTIONER_BACKEND=auto
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python3 -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
CMD ["captioner-serve", "--host", "0.0.0.0", "--port", "8000"]

# The default target: the full image.
FROM full
