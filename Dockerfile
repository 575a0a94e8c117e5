# The quota-sidecar image: `docker build -t quota-sidecar:0.1.0 .`
# The Helm chart (helm/quota-sidecar) runs exactly this ENTRYPOINT with CMD's verb first in its
# args, as UID 10001, with a read-only root filesystem (tests/test_helm.py checks both agree).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtualenv is self-contained, so the runtime stage copies it whole and carries no build
# context, caches or build tools; same base image, so its python path stays valid.
RUN python -m venv /opt/quota-sidecar
WORKDIR /src
# README.md is the package's long description: the build needs it.
COPY pyproject.toml README.md ./
COPY quota_sidecar ./quota_sidecar
RUN /opt/quota-sidecar/bin/pip install '.[server]' \
    && /opt/quota-sidecar/bin/quota-sidecar check-plans /src/quota_sidecar/default_plans.yaml

FROM ${PYTHON_IMAGE}
# Numeric, so Kubernetes' runAsNonRoot can verify it; the chart's runAsUser/runAsGroup.
RUN groupadd --system --gid 10001 quota \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/quota-sidecar --create-home \
       --shell /usr/sbin/nologin quota
COPY --from=build /opt/quota-sidecar /opt/quota-sidecar
# Bytecode was compiled at install; the chart's read-only root filesystem could not take more.
ENV PATH=/opt/quota-sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Outside Kubernetes (`docker run`), the relative default paths (.quota-sidecar/...) land here.
WORKDIR /var/lib/quota-sidecar
USER 10001:10001
# Admin API, gRPC health (probes), Prometheus metrics: the chart's default ports. The worker
# API is a unix socket in a volume shared with the worker, not a port.
EXPOSE 50052 8081 9464
ENTRYPOINT ["quota-sidecar"]
CMD ["serve"]
