# GPU image for rlhf-lightning: SFT -> reward model -> PPO, `python train.py` as the entrypoint.
#
#   docker build -t rlhf-lightning .
#   docker run --gpus all -v "$PWD/outputs:/app/outputs" rlhf-lightning trainer=gpu
#   docker run --gpus all -v "$PWD/outputs:/app/outputs" -v /data:/data -v /models:/models rlhf-lightning \
#       experiment=gpt2_hh trainer=gpu model.name_or_path=/models/gpt2 data.data_files=/data/hh/train.jsonl
#   docker run --gpus all -v "$PWD/outputs:/app/outputs" --entrypoint python rlhf-lightning \
#       -m rlhf.evaluation outputs/runs/DATE/TIME      # any other command of the project
#
# Runs land in /app/outputs (Hydra's run directory is relative to the working directory): mount it.
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 from Ubuntu 22.04's own archive (universe), and a virtual environment for the project.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# torch first, in its own layer (gigabytes; rebuilt only when pyproject.toml changes), at the exact
# version pyproject.toml pins. pyproject pins the CPU build the project is developed on; on GPU hosts
# a CUDA torch wheel of the same version replaces it: PyPI's Linux x86_64 wheel is already a CUDA
# build (its CUDA libraries come as nvidia-* wheels, so the base image's CUDA version does not
# matter, only the host driver), or pick one with e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# `pip install -e` below then finds torch==<pin> already satisfied (a +cuXXX local version matches).
ARG TORCH_INDEX_URL=
COPY pyproject.toml README.md ./
RUN TORCH_PIN="$(python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(d for d in deps if d.replace(" ", "").startswith("torch==")))')" \
    && echo "installing $TORCH_PIN ${TORCH_INDEX_URL:-from PyPI}" \
    && pip install "$TORCH_PIN" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# The project, installed as the README says.
COPY . .
RUN pip install -e ".[test]"

ENTRYPOINT ["python", "train.py"]
