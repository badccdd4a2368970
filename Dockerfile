# rag-api-core: the service (and, with another command, the local identity provider).
# Build: docker build -t rag-api-core .   Run: see docker-compose.yml and the README.

FROM python:3.11-slim AS build
WORKDIR /src
# README.md* : the package metadata names the README; the glob keeps the build
# working in a checkout that has none yet.
COPY pyproject.toml README.md* ./
COPY service ./service
COPY validators ./validators
# The package and its runtime dependencies only (no test extras), in a venv the
# final stage copies whole; pip itself is not needed at run time.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[speed]" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080
COPY --from=build /opt/venv /opt/venv
# A fixed unprivileged uid. /data is where the key store volume is mounted: owned
# by that user, so a fresh named volume is writable by the one-shot keys step.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && mkdir /data \
    && chown app /data
USER 10001
WORKDIR /data
EXPOSE 8080
# Python, not curl (slim images have none). /readyz is 200 once the signing keys
# are loaded and 503 while draining: what a load balancer should go by.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/readyz', timeout=2)"]
CMD ["python", "-m", "service", "serve"]
