#!/bin/sh
# Installs Debian's postgresql package when no server binaries are found.
# dworkers' tests and benchmark run their own server process from them; the
# package's system service is not used.
set -e
if [ -n "$DWORKERS_POSTGRESQL_BIN" ] && [ -x "$DWORKERS_POSTGRESQL_BIN/initdb" ]; then exit 0; fi
for initdb in /usr/lib/postgresql/*/bin/initdb; do
    if [ -x "$initdb" ]; then exit 0; fi
done
echo "PostgreSQL not found: installing Debian's postgresql package" >&2
exec "$(dirname "$0")/ensure-packages.sh" --no-services postgresql
