# fedunlearn for a Flower 1.42 deployment: one image runs the SuperLink, the SuperNodes and
# the ServerApp/ClientApp processes they start. torch is the CPU build by default; for CUDA
# build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126.
#   docker build -t fedunlearn .
#   docker network create fedunlearn
#   docker run --rm --network fedunlearn --name superlink -p 127.0.0.1:8000:8000 fedunlearn \
#       flower-superlink --insecure --host 0.0.0.0 --port 8000
#   docker run --rm --network fedunlearn fedunlearn flower-supernode --insecure \
#       --superlink superlink:8000 --node-config "partition-id=0 num-partitions=3"
# compose.yaml: a SuperLink, 3 SuperNodes and the run (docs/deployment.md, "Docker").
# The processes run as user fedunlearn (uid/gid 1000, or --build-arg FEDUNLEARN_UID=$(id -u)
# --build-arg FEDUNLEARN_GID=$(id -g) so that it owns the host folders you mount).
FROM python:3.11-slim

# PyTorch's wheel index for torch and torchvision (both from the same index, so that
# torchvision's extension matches torch); empty: PyPI's default build (CUDA on x86-64).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch>=2.4" "torchvision>=0.19"; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY flower_apps ./flower_apps
COPY presets ./presets
COPY conf ./conf
RUN pip install --no-cache-dir .

# Not root: the SuperLink, the SuperNodes and the apps they start run as this user, with
# its home (~/.flwr: Flower's state and installed apps; ~/.cache/fedunlearn: the
# pretrained-model cache) and the mount points compose.yaml uses owned by it. A GID that
# names an existing group (macOS's 20) is used as it is.
ARG FEDUNLEARN_UID=1000
ARG FEDUNLEARN_GID=1000
RUN (getent group "$FEDUNLEARN_GID" || groupadd --gid "$FEDUNLEARN_GID" fedunlearn) \
    && useradd --uid "$FEDUNLEARN_UID" --gid "$FEDUNLEARN_GID" --create-home \
       --shell /usr/sbin/nologin fedunlearn \
    && mkdir -p /data /results /inbox /flwr-home \
    && chown fedunlearn: /data /results /inbox /flwr-home
USER fedunlearn

# Data sets that are not embedded (CIFAR, Caltech-101) are mounted here.
VOLUME ["/data"]
# SuperLink: Fleet, Control and Runtime APIs on one port (flower-superlink --port).
EXPOSE 8000
CMD ["flower-supernode", "--help"]
