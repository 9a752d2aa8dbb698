# lmserve: `docker build -t lmserve .` then `docker run -p 8000:8000 lmserve` (add `--gpus all` for CUDA).
# A slim CPU image from a local wheel server:
#   docker build --network host --build-arg TORCH_SPEC=torch==2.13.0 \
#                --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/ -t lmserve .
FROM python:3.11-slim

# torch requirement: the registry's default build carries CUDA (and runs on CPU too)
ARG TORCH_SPEC=torch==2.13.0
# optional extra places for pip to look (a local wheel server, a mirror)
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
# 1: build lmserve's CPU kernels (service/kernels/*.c) into the image with a throwaway compiler
ARG CPU_KERNEL=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LMSERVE_HOST=0.0.0.0 \
    LMSERVE_PORT=8000 \
    LMSERVE_MODEL=/app/checkpoints/default \
    LMSERVE_KERNEL_DIR=/app/kernels

RUN useradd --create-home --uid 10001 lmserve
WORKDIR /app

# dependencies first (from pyproject.toml, pinned by constraints.txt): a code change reuses this layer
COPY pyproject.toml constraints.txt ./
RUN set -eux; \
    extra=""; \
    if [ -n "$PIP_FIND_LINKS" ]; then extra="$extra --find-links $PIP_FIND_LINKS"; fi; \
    if [ -n "$PIP_INDEX_URL" ]; then extra="$extra --index-url $PIP_INDEX_URL"; fi; \
    pip install --no-cache-dir $extra "$TORCH_SPEC"; \
    grep -v '^torch==' constraints.txt > /tmp/constraints.txt; \
    python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('torch')))" > /tmp/requirements.txt; \
    pip install --no-cache-dir $extra -c /tmp/constraints.txt -r /tmp/requirements.txt

COPY README.md ./
COPY model ./model
COPY service ./service
RUN pip install --no-cache-dir --no-deps . && python -c "import model, service"
# the compiler is installed, used and removed in one layer: only the built library stays
RUN set -eux; \
    if [ "$CPU_KERNEL" = "1" ]; then \
        apt-get update; apt-get install -y --no-install-recommends gcc libc6-dev; \
        python -m service.backends.cpu.library; \
        apt-get purge -y --auto-remove gcc libc6-dev binutils; apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi
COPY checkpoints/default ./checkpoints/default

USER lmserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"LMSERVE_PORT\", \"8000\")}/health', timeout=4)" || exit 1
# exec form: lmserve is PID 1 and gets docker stop's SIGTERM (it drains in-flight requests, then exits)
CMD ["lmserve", "serve"]
