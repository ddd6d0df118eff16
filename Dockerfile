# Image for rlhf-lightning: SFT -> reward model -> PPO, `python train.py` as the entrypoint.
#
# GPU, on a machine that can pull images (the default base is NVIDIA's CUDA runtime image):
#   docker build -t rlhf-lightning .
#   docker run --gpus all -v "$PWD/outputs:/app/outputs" rlhf-lightning trainer=gpu
#   docker run --gpus all -v "$PWD/outputs:/app/outputs" -v /data:/data -v /models:/models rlhf-lightning \
#       experiment=gpt2_hh trainer=gpu model.name_or_path=/models/gpt2 data.data_files=/data/hh/train.jsonl
#   docker run --gpus all -v "$PWD/outputs:/app/outputs" --entrypoint python rlhf-lightning \
#       -m rlhf.evaluation outputs/runs/DATE/TIME      # any other command of the project
#
# CPU, offline: any base image with python3.11 + venv (e.g. a Debian bookworm debootstrap imported
# with `docker import`) and a wheelhouse folder inside the build context; nothing is downloaded:
#   docker build --build-arg BASE_IMAGE=rlhf-base:bookworm --build-arg WHEELHOUSE=.wheelhouse -t rlhf-lightning:cpu .
# rlhf/deploy/docker/build_cpu_image.sh does all of it (base image, wheelhouse, build); see docs/deploy.md.
#
# Runs land in /app/outputs (Hydra's run directory is relative to the working directory): mount it.
#
# Stages: `base` (Python), `deps` (a venv with every dependency, from PyPI or the wheelhouse),
# `src` (the source without the wheelhouse), and the final image = base + deps' venv + src. The
# wheelhouse is only ever copied into `deps`, so none of its hundreds of MB reach the final image.
# Plain Dockerfile syntax: builds with the classic builder and with BuildKit alike.
ARG BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 and its venv module: taken from the base image when it has them (Debian bookworm's
# python3 is 3.11, so a debootstrap base needs no network here), else from the base's apt archive
# (Ubuntu 22.04 ships python3.11 in universe).
RUN if python3.11 -m ensurepip --version >/dev/null 2>&1; then \
        echo "python3.11 and ensurepip found in the base image"; \
    else \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# The venv itself is made in `deps` and copied whole into the final image: a venv in `base` too
# would leave its own pip/setuptools files under the copied one (COPY merges directories).
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

FROM base AS deps
RUN python3.11 -m venv /opt/venv

# WHEELHOUSE: a folder inside the build context holding every wheel the install needs (made by
# build_cpu_image.sh: the CPU torch wheel + all dependencies for CPython 3.11 linux x86_64). When
# set, pip installs with --no-index from it and never touches the network. When empty, the
# COPY below copies pyproject.toml as a placeholder (COPY cannot be conditional) and pip uses PyPI.
ARG WHEELHOUSE=
COPY ${WHEELHOUSE:-pyproject.toml} /wheels/
COPY pyproject.toml rlhf/deploy/docker/requirements.py /tmp/req/

# torch first, in its own layer, at the exact version pyproject.toml pins. pyproject pins the CPU
# build the project is developed on (the wheelhouse carries that +cpu wheel); on GPU hosts a CUDA
# torch wheel of the same version replaces it: PyPI's Linux x86_64 wheel is already a CUDA build
# (its CUDA libraries come as nvidia-* wheels, so the base image's CUDA version does not matter,
# only the host driver), or pick one with e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The dependencies after it find torch==<pin> already satisfied (a +cpu/+cuXXX local version matches).
ARG TORCH_INDEX_URL=
RUN TORCH_PIN="$(python /tmp/req/requirements.py /tmp/req/pyproject.toml --torch)" \
    && if [ -n "$WHEELHOUSE" ]; then \
           echo "installing $TORCH_PIN from the wheelhouse $WHEELHOUSE" \
           && pip install --no-index --find-links /wheels "$TORCH_PIN"; \
       else \
           echo "installing $TORCH_PIN from ${TORCH_INDEX_URL:-PyPI}" \
           && pip install "$TORCH_PIN" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}; \
       fi

# Every other dependency (with the test extra, and setuptools for the editable install below).
RUN python /tmp/req/requirements.py /tmp/req/pyproject.toml --extra test > /tmp/req/requirements.txt \
    && pip install ${WHEELHOUSE:+--no-index --find-links /wheels} -r /tmp/req/requirements.txt

FROM base AS src
ARG WHEELHOUSE=
COPY . /app
# The wheelhouse is in the context for `deps` only; .wheelhouse (build_cpu_image.sh's name) is
# dropped even when WHEELHOUSE is unset, should one be left over from an interrupted build.
RUN rm -rf /app/.wheelhouse \
    && case "$WHEELHOUSE" in ""|.|./|/) ;; *) rm -rf "/app/${WHEELHOUSE#/}" ;; esac

FROM base
COPY --from=deps /opt/venv /opt/venv
COPY --from=src /app /app
# The project, editable as the README installs it: the venv points at /app, so train.py, conf/ and
# the package are the one copy of the source, and `python -m rlhf...` runs what is in /app. Its
# dependencies are already in the venv (no network); pip check fails the build if any is missing.
RUN pip install --no-deps --no-build-isolation -e . && pip check

ENTRYPOINT ["python", "train.py"]
