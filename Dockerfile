# scratchgpt web service, CPU image.
#   docker build -t scratchgpt .
#   docker run -p 8000:8000 -v scratchgpt-data:/data scratchgpt
# On first start `scratchgpt serve` obtains SmolLM2-135M-Instruct and fine-tunes the spam
# classifier into /data/models if they are missing (minutes on a CPU), then serves on :8000.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned, from PyTorch's CPU index: the PyPI default pulls GBs of CUDA libraries.
# docker-compose.gpu.yml builds with a CUDA index instead.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0

# A C++ compiler: the chat model's kernels (core/fast/csrc) are compiled on first start.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/scratchgpt
COPY pyproject.toml README.md alembic.ini ./
COPY core/ core/
COPY training/ training/
COPY app/ app/
COPY scratchgpt/ scratchgpt/
COPY migrations/ migrations/
COPY templates/ templates/
COPY static/ static/
# Editable, so the app finds templates/, static/ and migrations/ beside its package; with psycopg,
# so the same image serves from PostgreSQL (docker-compose.scale.yml).
RUN pip install -e ".[postgres]"

RUN useradd --create-home --uid 10001 scratchgpt \
    && mkdir -p /data/models /data/db /data/downloads \
    && chown -R scratchgpt:scratchgpt /data
USER scratchgpt

ENV SCRATCHGPT_HOME=/data \
    SCRATCHGPT_DATABASE_URL=sqlite:////data/db/scratchgpt.db \
    SCRATCHGPT_SECRET_KEY_FILE=/data/db/secret_key
VOLUME ["/data/models", "/data/db"]
EXPOSE 8000

# The first start may obtain and fine-tune the models before it listens, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

CMD ["scratchgpt", "serve", "--host", "0.0.0.0"]
