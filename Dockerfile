# pscnn: one image for the parameter server, the workers and the evaluator.
#   docker build -t pscnn .            (or: docker compose build)
# The image holds the package and its runtime dependencies only: no data, no dev tools.
# MNIST is read from MNIST_DIR or downloaded at run time into PSCNN_CACHE_DIR (a volume).
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build stage: install the package into a self-contained virtual environment ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The dependencies first, from pyproject.toml alone (tomllib: a Python >= 3.11 image), in a
# layer of their own: an edit to the source or the README rebuilds only the package's layer,
# not numpy's and pyzmq's. With the `fast` extra: its threadpoolctl tells cnn_core which
# OpenBLAS kernels run, and a worker's step on AVX-512 is 1.08x faster for it.
COPY pyproject.toml ./
RUN python -m venv /opt/pscnn \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['fast'], sep='\n')" \
        >/tmp/requirements.txt \
 && /opt/pscnn/bin/pip install --no-cache-dir -r /tmp/requirements.txt
# .dockerignore lets through only pyproject.toml, README.md, LICENSE and the package folders.
COPY . .
RUN /opt/pscnn/bin/pip install --no-cache-dir --no-deps . \
 && /opt/pscnn/bin/pip check \
 && /opt/pscnn/bin/pip uninstall -y -q setuptools pip \
 && find /opt/pscnn -type d -path '*/site-packages/numpy/*' -name tests -prune -exec rm -rf {} + \
 && /opt/pscnn/bin/pscnn --help >/dev/null

# ---- runtime stage ----
FROM ${PYTHON_IMAGE}
ARG PSCNN_UID=10001
RUN groupadd --system --gid "${PSCNN_UID}" pscnn \
 && useradd --system --uid "${PSCNN_UID}" --gid pscnn --home-dir /home/pscnn --create-home \
        --shell /usr/sbin/nologin pscnn \
 && mkdir -p /data/mnist /data/runs \
 && chown pscnn:pscnn /data/mnist /data/runs
COPY --from=build /opt/pscnn /opt/pscnn
ENV PATH=/opt/pscnn/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PSCNN_CACHE_DIR=/data/mnist
USER pscnn
WORKDIR /home/pscnn
# 5555: the parameter server's ZeroMQ port (only the server binds it).
EXPOSE 5555
# Run it under an init (docker run --init; init: true in docker-compose.yml): as PID 1, pscnn
# would miss a stop signal that comes before its handler is set (docs/deployment.md, "Run it").
ENTRYPOINT ["pscnn"]
CMD ["--help"]
