# syntax=docker/dockerfile:1
# The gateway image the Helm chart (deploy/helm/gateway) runs.
#
#   docker build -t registry.example.com/gateway:0.1.0 .
#
# Stage 1 builds the gateway's wheel and installs it with its dependencies into
# a virtualenv; stage 2 copies only that virtualenv onto a clean slim Python,
# so no compiler, pip, setuptools or wheel reaches the final image. The user is
# numeric (10001, the chart's runAsUser) so that runAsNonRoot can verify it.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install /wheels/gateway-*.whl \
 && /opt/gateway/bin/pip uninstall -y pip setuptools wheel \
 && /opt/gateway/bin/gateway --help >/dev/null

FROM ${PYTHON_IMAGE} AS final
# The base image's own pip/setuptools/wheel go too: nothing installs at run time.
RUN python -m pip uninstall -y pip setuptools wheel \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# /etc/gateway is where the chart mounts its ConfigMap (routes.yaml); /bin/sh
# (from the base image) runs the chart's preStop hook.
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/routes.yaml"]
