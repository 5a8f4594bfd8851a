# A GPU worker of the Prefect work pool `gpu`: CUDA, the project at requirements/lock.txt's pins, DeepSpeed.
# Built from the repository root: docker build -f infra/docker/worker.Dockerfile -t vlmops-worker .
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv git \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/vlmops
# Dependencies first (a layer that survives code changes), then the code.
COPY pyproject.toml README.md ./
COPY requirements/lock.txt requirements/lock.txt
# torch: the CUDA build pip picks for this image (the lock leaves torch out on purpose).
RUN pip install 'torch>=2.11' && mkdir -p vlmops flows tasks && touch vlmops/__init__.py flows/__init__.py tasks/__init__.py \
    && pip install -c requirements/lock.txt -e . \
    && DS_BUILD_OPS=0 pip install --no-build-isolation -c requirements/lock.txt deepspeed
COPY . .
# prefect.yaml's pull step runs the flows from here.
ENV VLMOPS_HOME=/opt/vlmops
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
