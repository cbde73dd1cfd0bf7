#!/bin/sh
# Builds the image named $1 (localhost/dworkers-base:bookworm): Debian's
# Python 3.11, pip, venv and tini, made with debootstrap from the mirror apt
# is configured with. The Dockerfile's build-arg PYTHON_IMAGE takes it on
# machines that reach no container registry (pinned python:3.11-slim
# otherwise). Rebuilt only when this recipe changes.
set -e
IMAGE="$1"
SUITE=bookworm
PODMAN="$(dirname "$0")/podman.sh"
RECIPE="$(sha256sum "$0" | cut -c1-16)"
if "$PODMAN" image exists "$IMAGE" \
    && [ "$("$PODMAN" image inspect --format '{{index .Labels "dworkers.recipe"}}' "$IMAGE")" = "$RECIPE" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
command -v debootstrap >/dev/null 2>&1 || "$(dirname "$0")/ensure-packages.sh" debootstrap

# The first Debian mirror of apt's sources (deb822 or one-line format).
MIRROR="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2; exit}')"
[ -n "$MIRROR" ] || MIRROR="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | grep -v security | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}')"
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian

ROOTFS="$(mktemp -d)"
trap '$SUDO rm -rf "$ROOTFS"' EXIT INT TERM
echo "building $IMAGE with debootstrap from $MIRROR" >&2
$SUDO debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,tini,ca-certificates \
    "$SUITE" "$ROOTFS/root" "$MIRROR" > "$ROOTFS/debootstrap.log" 2>&1 \
    || { tail -20 "$ROOTFS/debootstrap.log" >&2; exit 1; }
# What an image does not need; pip may install into the image's venvs.
$SUDO rm -rf "$ROOTFS"/root/var/cache/apt/archives/*.deb "$ROOTFS"/root/var/lib/apt/lists/* \
    "$ROOTFS"/root/usr/share/doc "$ROOTFS"/root/usr/share/man "$ROOTFS"/root/usr/share/locale
$SUDO rm -f "$ROOTFS"/root/usr/lib/python3*/EXTERNALLY-MANAGED
$SUDO tar --numeric-owner -C "$ROOTFS/root" -c . | "$PODMAN" import --quiet \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "LABEL dworkers.recipe=$RECIPE" --change 'CMD ["python3"]' - "$IMAGE" > /dev/null
