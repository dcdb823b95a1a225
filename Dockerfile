# syntax=docker/dockerfile:1
# hongbao worker image: one aiohttp worker per container (`python -m app worker`);
# HAProxy (its own container) balances across replicas. Settings come from the environment.

# --- build: a virtualenv with the dependencies declared in pyproject.toml ---------------
FROM python:3.11.10-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
# Dependencies only (the source is copied as-is into the runtime stage, next to lua/).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
COPY app ./app
COPY lua ./lua
RUN /opt/venv/bin/python -m compileall -q app

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
COPY --from=build /src/app /srv/hongbao/app
COPY --from=build /src/lua /srv/hongbao/lua
WORKDIR /srv/hongbao
USER 10001:10001
EXPOSE 8080
# Liveness only (the process answers); readiness (/readyz) is the balancer's business.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# SIGTERM starts the graceful drain (app/lifecycle.py); exec form so it reaches Python.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app", "worker"]
