#!/bin/sh
# apt-get install the named Debian packages, as root or through sudo.
# With --no-services first, the packages' system services are not started
# during the install (dworkers runs its own server processes): a temporary
# /usr/sbin/policy-rc.d answers 101, honoured by invoke-rc.d and
# deb-systemd-invoke, unless the machine already has such a policy; on a
# machine running systemd, the named units are disabled afterwards.
set -e
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
UNITS=""
if [ "$1" = "--no-services" ]; then
    shift
    UNITS="$*"
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        trap '$SUDO rm -f "$POLICY"' EXIT INT TERM
        printf '#!/bin/sh\n# temporary, from dworkers scripts/ensure-packages.sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
        $SUDO chmod 755 "$POLICY"
    fi
fi
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq "$@" >/dev/null
if [ -n "$UNITS" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    for unit in $UNITS; do
        case "$unit" in -*) continue ;; esac
        $SUDO systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
    done
fi
