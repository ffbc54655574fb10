# The gateway image: one image for the api, worker and migrate processes (see compose.yaml).
# Dependencies come from uv.lock, in a layer of their own, so a code change rebuilds only the last
# one; the project is installed as a package (not editable): the image holds no checkout.
FROM python:3.11-slim AS build

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/gateway \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uv release as the Makefile's UV_VERSION.
RUN pip install 'uv==0.13.9'

WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project
COPY README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
RUN uv sync --locked --no-dev --no-editable


FROM python:3.11-slim

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ENVIRONMENT=production

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
# The working directory is writable by the gateway user: the worker's liveness file goes here.
WORKDIR /var/lib/gateway
RUN chown gateway /var/lib/gateway
USER gateway

EXPOSE 8000
# `gateway healthcheck` asks the API's /live, or, in a worker, checks that its heartbeat is fresh.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["gateway", "healthcheck"]
CMD ["gateway", "api", "--host", "0.0.0.0", "--port", "8000"]
