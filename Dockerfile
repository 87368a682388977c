# syntax=docker/dockerfile:1
# DICOM Store SCP container: the `dicom-store-scp` daemon as PID 1, running as `dicomuser`.
#
# Base: python:3.12-slim (Debian, glibc). pynetdicom, pydicom and boto3 are pure Python, so Alpine (musl) would
# work too and is about 30 MB smaller; slim is chosen because the receiver is CPU-bound and CPython's allocation-
# heavy work is commonly slower on musl's allocator, and because glibc installs manylinux wheels as they are if a
# native dependency (e.g. a JPEG codec) is ever added. The slim variant has no compiler and no package caches.
# --- Build stage: a virtual environment with the pinned dependencies and the daemon -------------------------------
FROM python:3.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Every runtime dependency pinned, transitive ones included, so a rebuild installs the same code.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps \
        pynetdicom==3.0.4 \
        pydicom==3.0.2 \
        boto3==1.44.5 \
        botocore==1.44.5 \
        s3transfer==0.19.3 \
        jmespath==1.1.0 \
        python-dateutil==2.9.0.post0 \
        six==1.17.0 \
        urllib3==2.8.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scp ./scp
COPY batch_contract ./batch_contract
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip check

# --- Runtime stage -------------------------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm
# The version is pyproject.toml's (tests/templates/test_release.py keeps them equal).
LABEL org.opencontainers.image.title="DICOM Store SCP for AWS HealthImaging" \
      org.opencontainers.image.description="Receives DICOM C-STORE and stores to Amazon S3 for AWS HealthImaging import" \
      org.opencontainers.image.version="2.0.0"

# A fixed UID/GID, so a task definition or Kubernetes securityContext can name it.
RUN groupadd --system --gid 10001 dicomuser \
    && useradd --system --uid 10001 --gid dicomuser --home-dir /app --shell /usr/sbin/nologin dicomuser \
    && mkdir -p /app/storage \
    && chown -R dicomuser:dicomuser /app/storage

COPY --from=build /opt/venv /opt/venv

# The receive area must be writable when the root filesystem is read-only. ECS/Fargate copies the image's content
# and ownership of a VOLUME path into the task's bind mount, which keeps it writable for dicomuser.
VOLUME ["/app/storage"]

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STORAGE_DIR=/app/storage \
    SCP_PORT=11112

WORKDIR /app
USER 10001:10001
EXPOSE 11112

# The daemon's own check: a real association and C-ECHO on SCP_PORT, not just an open port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 CMD ["dicom-store-scp", "healthcheck"]

# Exec form, so the daemon is PID 1 and receives SIGTERM itself (it drains associations, then exits).
ENTRYPOINT ["dicom-store-scp"]
