# The Telegram bot (and the indexer CLI) in a slim image.
#
#   docker build -t imgsearch .
#   docker run --rm -v imgsearch-data:/data -v "$PWD/photos:/photos:ro" \
#       --entrypoint imgsearch-index imgsearch build /photos --index /data/index
#   docker run -d --name imgsearch --restart unless-stopped --stop-timeout 30 \
#       -e TELEGRAM_BOT_TOKEN -v imgsearch-data:/data -v "$PWD/photos:/photos:ro" \
#       -v "$PWD/config.toml:/config/config.toml:ro" imgsearch
#
# Dask scheduler and workers for `build --dask` run from the same image built with the dask
# extra (docker build --build-arg EXTRAS=dask -t imgsearch:dask .): see docs/CLUSTER.md.
#
# config.toml must say dir = "/data/index" under [index]. The offline collection's photos are
# read from /photos (results are sent from there), photos added in chats are kept under
# /data/index/originals: keep /data on a volume. SIGTERM lets the adds in flight finish first.

ARG PYTHON_VERSION=3.11

# --- builder: compiles annoy's C++ extension, installs everything into a venv -------------
FROM python:${PYTHON_VERSION}-slim AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# Optional extras of pyproject.toml, comma-separated: "dask" (or "s3") for a Dask cluster's image.
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
# Dependencies first, so that editing the code does not rebuild them.
COPY pyproject.toml README.md /src/
RUN mkdir -p /src/indexer /src/bot && touch /src/indexer/__init__.py /src/bot/__init__.py \
    && /opt/venv/bin/pip install "/src${EXTRAS:+[$EXTRAS]}" \
    && /opt/venv/bin/pip uninstall -y imgsearch
COPY indexer /src/indexer
COPY bot /src/bot
RUN /opt/venv/bin/pip install --no-deps /src

# --- runtime: no compiler, a non-root user ---------------------------------------------------
FROM python:${PYTHON_VERSION}-slim

# tini reaps the worker processes and forwards SIGTERM to the bot.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin bot \
    && mkdir -p /app /config /data/index /photos \
    && chown bot:bot /data /data/index

COPY --from=builder /opt/venv /opt/venv
COPY config.example.toml /app/

# numba caches its compiled voting kernel beside the source, which the bot user
# cannot write; a cache it can write saves each start the compilation (about a second).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /app
USER bot
VOLUME ["/data", "/photos"]

ENTRYPOINT ["tini", "--", "imgsearch-bot"]
CMD ["--config", "/config/config.toml"]
