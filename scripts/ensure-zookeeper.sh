#!/bin/sh
# Installs Debian's zookeeper package (and a Java runtime) when no ZooKeeper
# jar is found. dworkers runs its own server process from the jar; the
# package's system service is not used.
set -e
if [ -n "$DWORKERS_ZOOKEEPER_JAR" ] && [ -f "$DWORKERS_ZOOKEEPER_JAR" ]; then exit 0; fi
if [ -f /usr/share/java/zookeeper.jar ] && command -v java >/dev/null 2>&1; then exit 0; fi
echo "ZooKeeper not found: installing Debian's zookeeper package" >&2
exec "$(dirname "$0")/ensure-packages.sh" zookeeper default-jre-headless
