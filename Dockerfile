# dsm: the engine, its HTTP API and its example machines. Workers, the API and clients all run this image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY dsm ./dsm
COPY schemas ./schemas
RUN pip install ".[api]"

COPY definitions ./definitions
RUN useradd --system --create-home dsm
USER dsm
EXPOSE 8080

# `docker compose` passes the command; alone, the image shows the CLI's help.
CMD ["dsm", "--help"]
