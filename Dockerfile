# Image for fleetflow's own processes: the API and the per-queue workers.
# Same image, different command (see docker-compose.temporal.yml):
#   fleetflow api
#   fleetflow worker --queue <orchestration|device|data|analytics|notification>
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    FLEETFLOW_DATA_DIR=/var/lib/fleetflow

# Unprivileged runtime user (embedded PostgreSQL also refuses to run as root).
RUN groupadd --system --gid 10001 fleetflow \
 && useradd --system --uid 10001 --gid fleetflow \
        --home-dir /home/fleetflow --create-home --shell /usr/sbin/nologin fleetflow \
 && install -d -o fleetflow -g fleetflow -m 0750 /var/lib/fleetflow \
 && install -d -o fleetflow -g fleetflow -m 0700 /var/lib/fleetflow/keys \
 && install -d -o fleetflow -g fleetflow -m 0700 /var/lib/fleetflow/data

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . \
 && chown fleetflow:fleetflow /app

USER fleetflow:fleetflow
EXPOSE 8000
CMD ["fleetflow", "api"]
