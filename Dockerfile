# unimlip on a CUDA PyTorch base. Build: docker build -t unimlip .
# Run:   docker run --gpus all --ipc=host -v /data:/data unimlip unimlip-train --config configs/vitb16_biomedbert.yaml
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# g++ and ninja: DeepSpeed compiles some ops just in time on first use.
RUN apt-get update && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/unimlip
COPY requirements.txt requirements-test.txt setup.py README.md ./
# The base image's CUDA torch stays; the rest of the pinned set is installed around it.
RUN grep -v -E '^(torch|torchvision)==' requirements.txt > /tmp/requirements-docker.txt \
    && pip install --no-cache-dir -r /tmp/requirements-docker.txt
COPY unimlip_train ./unimlip_train
COPY data_prep ./data_prep
COPY launch ./launch
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps . && unimlip-train --help > /dev/null

CMD ["unimlip-train", "--help"]
