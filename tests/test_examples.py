"""The examples run as a user runs them, against a real cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import frontend, wait_kind

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "python"


def test_the_python_example(cluster):
    """The worker imports the app's jobs from the app's folder (no
    PYTHONPATH), and the producer prints what the README shows."""
    cluster.start_master(None, wait=True)
    front = cluster.start_frontend()
    cluster.start_worker(2, "--jobs", "shop.jobs", cwd=EXAMPLE)
    wait_kind(frontend(front.address), "notify")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "producer.py", "--frontend", front.address], cwd=EXAMPLE, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["price"] == "{'total': 35.1, 'items': 2}"
    assert lines["checksum"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert re.fullmatch(r"notified ada \(work [0-9a-f-]{36}, attempt 1\)", lines["notify"])
    assert lines["prices of 100 orders"] == "1.0 ... 100.0 sum 5050.0"
    assert lines["refused order"].startswith("ValueError: negative total -5.0")
