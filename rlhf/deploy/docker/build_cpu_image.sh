#!/usr/bin/env bash
# Build the CPU image of rlhf-lightning without pulling any image from a registry:
#   1. a Debian bookworm base image from Debian packages (debootstrap + docker import),
#   2. a wheelhouse of every Python dependency (the CPU torch wheel included), downloaded on the host,
#   3. `docker build` with --build-arg BASE_IMAGE=<that base> --build-arg WHEELHOUSE=.wheelhouse.
# Needs: root (debootstrap), a running docker daemon, debootstrap, and a host Python 3.11 with pip
# (bookworm's python3 is 3.11, so the wheels fit the image; run it with the dev venv active).
#
#   rlhf/deploy/docker/build_cpu_image.sh            # -> rlhf-lightning:cpu
#
# Settings (environment): WORK (where rootfs and wheelhouse live, outside the repo; default
# /work/docker-build), BASE_TAG (rlhf-base:bookworm), IMAGE_TAG (rlhf-lightning:cpu), MIRROR
# (http://deb.debian.org/debian), PYTHON (python3), PIP_ARGS (extra `pip wheel` arguments; where pip
# is not already set up to find the CPU torch wheel, e.g.
# PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu").
# Steps 1 and 2 are skipped when their result is already there, so a rebuild after a code change
# is step 3 alone.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
WORK="${WORK:-/work/docker-build}"
BASE_TAG="${BASE_TAG:-rlhf-base:bookworm}"
IMAGE_TAG="${IMAGE_TAG:-rlhf-lightning:cpu}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-python3}"
PIP_ARGS="${PIP_ARGS:-}"

die() { echo "build_cpu_image.sh: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 \
    || die "no docker daemon answers; start one, e.g. 'dockerd > /tmp/dockerd.log 2>&1 &' (Debian: apt-get install docker.io)"
mkdir -p "$WORK"

# 1. Base image. minbase + python3 (3.11 on bookworm) + python3-venv (ensurepip for the venv) +
# ca-certificates. The .done marker tells a finished debootstrap from an interrupted one. Downloaded
# .debs and apt lists are left out of the tarball (~95 MB; `apt-get update` brings the lists back).
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "== 1. base image $BASE_TAG exists; reusing it (docker rmi $BASE_TAG to rebuild)"
else
    if [ ! -f "$WORK/rootfs.done" ]; then
        command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
        echo "== 1. debootstrap bookworm into $WORK/rootfs"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" "$MIRROR"
        touch "$WORK/rootfs.done"
    fi
    echo "== 1. docker import $WORK/rootfs as $BASE_TAG"
    tar -C "$WORK/rootfs" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' -c . \
        | docker import --change 'ENV LANG=C.UTF-8' - "$BASE_TAG"
fi

# 2. Wheelhouse: the requirements pyproject.toml declares (build backend, dependencies with the
# torch pin, the test extra), as wheels for this Python 3.11 / linux x86_64. `pip wheel` keeps
# downloaded wheels and turns sdist-only packages (antlr4-python3-runtime, future) into wheels, so
# nothing has to be built inside the image. Redone only when the requirement list changes.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is not Python 3.11; the image's bookworm python3 is, and the wheels must match it"
WH="$WORK/wheelhouse"
REQS="$(cd "$REPO" && "$PYTHON" rlhf/deploy/docker/requirements.py pyproject.toml --extra test --all)"
if [ -f "$WH/requirements.txt" ] && [ "$(cat "$WH/requirements.txt")" = "$REQS" ]; then
    echo "== 2. wheelhouse $WH is up to date with pyproject.toml; reusing it"
else
    echo "== 2. pip wheel into $WH"
    rm -rf "$WH"
    mkdir -p "$WH"
    printf '%s\n' "$REQS" > "$WORK/requirements.txt"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of arguments
    "$PYTHON" -m pip wheel --wheel-dir "$WH" -r "$WORK/requirements.txt" $PIP_ARGS
    printf '%s\n' "$REQS" > "$WH/requirements.txt"
fi
# The image must get the CPU build of the pinned torch, never PyPI's multi-GB CUDA one.
TORCH_PIN="$(cd "$REPO" && "$PYTHON" rlhf/deploy/docker/requirements.py pyproject.toml --torch)"
TORCH_VERSION="${TORCH_PIN#torch==}"
ls "$WH"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl >/dev/null 2>&1 \
    || die "$WH has no torch-$TORCH_VERSION+cpu wheel ($(cd "$WH" && ls torch-* 2>/dev/null || echo none));" \
           "rm -r $WH and rerun with PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'"
if ls "$WH"/nvidia_* >/dev/null 2>&1; then die "$WH holds nvidia-* wheels: a CUDA torch got in"; fi
echo "   $(ls "$WH"/*.whl | wc -l) wheels, $(du -sh "$WH" | cut -f1), $(cd "$WH" && ls torch-*.whl)"

# 3. Build. The wheelhouse must sit inside the build context (the classic builder takes one
# context, and this daemon's docker has no buildx for --build-context): hard-link it in as
# .wheelhouse/ (no copy on the same filesystem) for this build only; the trap removes it, and the
# Dockerfile keeps it out of the final image.
rm -rf "$REPO/.wheelhouse"
trap 'rm -rf "$REPO/.wheelhouse"' EXIT
cp -al "$WH" "$REPO/.wheelhouse" 2>/dev/null || { rm -rf "$REPO/.wheelhouse"; cp -r "$WH" "$REPO/.wheelhouse"; }
echo "== 3. docker build -t $IMAGE_TAG"
start=$(date +%s)
docker build --build-arg BASE_IMAGE="$BASE_TAG" --build-arg WHEELHOUSE=.wheelhouse -t "$IMAGE_TAG" "$REPO"
echo "== built $IMAGE_TAG in $(( $(date +%s) - start )) s"
docker images "$IMAGE_TAG"
