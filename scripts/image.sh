#!/bin/sh
# `make image`: builds $IMAGE from deploy/Dockerfile with podman, on
# $BASE_IMAGE (made from Debian's packages when it is the local base's name;
# empty: the Dockerfile's pinned python:3.11-slim). `make image-test`
# (argument `test`) then runs the container test (tests/test_image.py).
# Installs podman and runc when missing; on a machine that cannot run
# containers at all, says so in one line and does nothing else.
set -e
cd "$(dirname "$0")/.."
: "${IMAGE:?IMAGE is the tag to build}"
LOCAL_BASE=localhost/dworkers-base:bookworm
PODMAN=scripts/podman.sh

if ! command -v podman > /dev/null 2>&1 || ! command -v runc > /dev/null 2>&1; then
    echo "podman or runc not found: installing Debian's packages" >&2
    scripts/ensure-packages.sh --no-install-recommends podman runc
fi
if ! why="$($PODMAN info 2>&1 > /dev/null)"; then
    echo "this machine cannot run containers (podman info: $(echo "$why" | head -1)): the image is neither built nor tested"
    exit 0
fi

started=$(date +%s)
base_args=""
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then
    scripts/base-image.sh "$LOCAL_BASE"
    if ! why="$($PODMAN run --rm --network host "$LOCAL_BASE" true 2>&1)"; then
        echo "this machine cannot run containers ($(echo "$why" | tail -1)): the image is neither built nor tested"
        exit 0
    fi
fi
[ -n "$BASE_IMAGE" ] && base_args="--build-arg PYTHON_IMAGE=$BASE_IMAGE"
# pip in the build trusts what the host trusts (a proxy's CA, for one).
ca_args=""
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    ca_args="--volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt"
fi
# --format docker keeps the HEALTHCHECK (the OCI format has none). The
# build's output is shown when it fails.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT INT TERM
# shellcheck disable=SC2086
$PODMAN build --format docker --network host --file deploy/Dockerfile \
    --ignorefile deploy/Dockerfile.dockerignore $base_args $ca_args --tag "$IMAGE" . > "$log" 2>&1 \
    || { tail -40 "$log" >&2; echo "building $IMAGE failed" >&2; exit 1; }
# Images the new build left untagged (bounded disk on a CI machine).
$PODMAN image prune --force > /dev/null
echo "built $IMAGE in $(( $(date +%s) - started )) s"

if [ "$1" = test ]; then
    started=$(date +%s)
    DWORKERS_IMAGE="$IMAGE" .venv/bin/python -m pytest -q -m container tests
    echo "container test of $IMAGE took $(( $(date +%s) - started )) s"
fi
