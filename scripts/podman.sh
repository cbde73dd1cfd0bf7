#!/bin/bash
# podman as the image targets and the container test run it: rootful (through
# sudo when not root), with runc (crun fails on hosts with hybrid cgroups),
# cgroupfs (no systemd needed) and, for containers and build steps, open
# files and processes limits no higher than this host's: podman's defaults
# are higher, and runc is refused a limit above the host's hard one (for
# processes, above its pid_max too).
set -e
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
case "$1" in
    run|create|build)
        command="$1"
        shift
        nofile="$(ulimit -Hn)"
        nproc="$(ulimit -Hu)"
        [ "$nofile" = unlimited ] && nofile=1048576
        pid_max="$(cat /proc/sys/kernel/pid_max)"
        if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc="$pid_max"; fi
        exec $SUDO podman --runtime runc --cgroup-manager cgroupfs "$command" \
            --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" "$@"
        ;;
esac
exec $SUDO podman --runtime runc --cgroup-manager cgroupfs "$@"
