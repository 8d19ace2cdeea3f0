# fedunlearn image for deployment: the same image runs the SuperLink, SuperNodes and the
# ServerApp/ClientApp processes (the app's Python dependencies are baked in).
#   docker build -t fedunlearn .
#   docker run --rm --network host fedunlearn flower-superlink --insecure
#   docker run --rm --network host fedunlearn flower-supernode --insecure \
#       --superlink 127.0.0.1:9092 --clientappio-api-address 127.0.0.1:9094 \
#       --node-config "partition-id=0 num-partitions=3 forget-scope='client'"
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY flower_apps ./flower_apps
COPY presets ./presets
COPY conf ./conf
RUN pip install --no-cache-dir .

# Data sets that are not embedded (CIFAR, Caltech-101) are mounted here.
VOLUME ["/data"]
CMD ["flower-supernode", "--help"]
