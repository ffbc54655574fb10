# The gateway image: one image for the api, worker and migrate processes (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv
COPY . .
# Editable, so the code runs from /srv where `gateway migrate` finds alembic.ini and migrations/.
RUN pip install -e . && useradd --system --no-create-home gateway
USER gateway

EXPOSE 8000
CMD ["gateway", "api", "--host", "0.0.0.0", "--port", "8000"]
