# paramserver's container image.
#
#   docker build -t paramserver .                                  # the service
#   docker build -t paramserver:tf --build-arg WITH_TENSORFLOW=1 .  # plus TensorFlow (TFOptimizer)
#   docker run --rm -p 127.0.0.1:8000:8000 -e PARAMSERVER_TOKENS=secret paramserver
#
# Two stages: "builder" installs the dependencies (read from pyproject.toml) and a wheel of the
# project into the virtual environment /opt/venv; the final stage is the base image plus that
# environment, run by an unprivileged user. No compiler, build tool or test dependency reaches
# it. docs/deployment.md explains every setting.

ARG BASE=python:3.11-slim

# --- builder ---------------------------------------------------------------------------------
FROM ${BASE} AS builder

# 1: also install the "tensorflow" extra (tensorflow-cpu, several hundred MB), for TFOptimizer.
ARG WITH_TENSORFLOW=0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that this (slow) layer is reused for as long
# as the dependency list does not change.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extra = project['optional-dependencies']['tensorflow'] if sys.argv[1] == '1' else []; \
print('\n'.join(project['dependencies'] + extra))" "${WITH_TENSORFLOW}" > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt

# Then the project itself, as a wheel (not editable; its dependencies are already there).
# (pyproject.toml again, so that the pattern for the README, which the metadata embeds, always
# has a file to match.)
COPY pyproject.toml README* ./
COPY paramserver ./paramserver
COPY app ./app
COPY client ./client
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
 && pip install --no-cache-dir --no-deps /tmp/wheels/paramserver-*.whl \
 && paramserver --version

# --- runtime ---------------------------------------------------------------------------------
FROM ${BASE}

ARG WITH_TENSORFLOW=0
LABEL org.opencontainers.image.title="paramserver" \
      org.opencontainers.image.description="A parameter server with exact Keras 2.2 optimizer semantics" \
      org.opencontainers.image.licenses="MIT" \
      paramserver.with-tensorflow="${WITH_TENSORFLOW}"

# The service runs as "paramserver" (uid and gid 10001, no login, no home); USER names it by
# number, so that a runtime can check it is not root (Kubernetes' runAsNonRoot). /data is where
# snapshots go when PARAMSERVER_SNAPSHOT_DIR=/data; a named volume mounted there starts out
# owned by this user.
RUN groupadd --system --gid 10001 paramserver \
 && useradd --system --uid 10001 --gid paramserver --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin paramserver \
 && mkdir -p /data \
 && chown paramserver:paramserver /data

COPY --from=builder /opt/venv /opt/venv

# The numba kernels, compiled now (5-10 s) instead of at every container start: into numba's
# in-tree cache, the installed package's __pycache__ (NUMBA_CACHE_DIR is not set yet), which
# is read-only at run time. At start-up the server copies them into NUMBA_CACHE_DIR and loads
# them (0.3 s). They are built for this machine's CPU: on another CPU the server compiles its
# own once into NUMBA_CACHE_DIR (docs/deployment.md, "Fast start and readiness").
RUN /opt/venv/bin/python -c \
        "from paramserver.server.optim.numba_kernels import build_cache; build_cache()"

# A container must listen on all of its interfaces to be reachable from outside it (the
# service's own default is 127.0.0.1). The server warns at start-up while no token is set:
# set PARAMSERVER_TOKENS (or PARAMSERVER_TOKENS_FILE) wherever the port is reachable.
# numba needs a writable cache directory even to load the kernels: /tmp (a tmpfs or an
# emptyDir with a read-only root file system; if nothing is writable the server tries
# /dev/shm, then compiles in memory).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    PARAMSERVER_HOST=0.0.0.0 \
    PARAMSERVER_PORT=8000 \
    PARAMSERVER_DATA_PLANE_PORT=8001

USER 10001:10001
WORKDIR /tmp
# 8000: the REST API; 8001: the data plane (push and pull at wire speed, docs/protocol.md).
EXPOSE 8000 8001

# GET /ready on loopback (the slim image has no curl): healthy once the sessions are recovered
# and the kernels loaded; follows PARAMSERVER_PORT, and speaks https when a certificate is
# mounted and PARAMSERVER_SSL_CERTFILE names it (docs/deployment.md). Liveness is /health.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["paramserver", "health", "--ready"]

# Exec form: the server is PID 1 and gets SIGTERM from "docker stop" itself; it then finishes
# the requests in flight, runs its shutdown (final snapshots) and exits 0.
CMD ["paramserver", "serve"]
