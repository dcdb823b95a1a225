# syntax=docker/dockerfile:1
# hongbao worker image: one aiohttp worker per container (`python -m app worker`);
# HAProxy (its own container) balances across replicas. Settings come from the environment.

# --- build: the project's wheel (app/ with lua/, migrations and static inside), installed
# with its dependencies into a virtualenv ------------------------------------------------
FROM python:3.11.10-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY app ./app
COPY lua ./lua
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir --compile /wheels/hongbao-*.whl

# --- runtime ---------------------------------------------------------------------------
FROM python:3.11.10-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080
RUN groupadd --system --gid 10001 hongbao \
 && useradd --system --uid 10001 --gid hongbao --no-create-home --shell /usr/sbin/nologin hongbao
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/hongbao
USER 10001:10001
EXPOSE 8080
# Liveness only (the process answers); readiness (/readyz) is the balancer's business.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# SIGTERM starts the graceful drain (app/web/lifecycle.py); exec form so it reaches Python.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app", "worker"]
