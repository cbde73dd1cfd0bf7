"""Which of gRPC's I/O engines dworkers' own processes use. gRPC reads
GRPC_EXPERIMENTS once, when it is first imported: the command line sets it
before importing anything else.

gRPC's newer EventEngine reads and writes on threads of its own and hands
every message to the Python thread waiting for it; the polling engine it
replaces does the I/O in that waiting thread. Our services are Python
processes exchanging many small messages on 2-4 cores, where each hand-off
between threads is a wake-up and a turn of the GIL: with the polling engine
a submit-then-result round trip switched threads ~30 % less often in the
master and the workers, and took ~5 % less time. A GRPC_EXPERIMENTS in the
environment wins (set it empty for gRPC's defaults)."""

from __future__ import annotations

import os

POLLING_ENGINE = "-event_engine_client,-event_engine_listener"


def choose() -> None:
    """Before gRPC is imported."""
    os.environ.setdefault("GRPC_EXPERIMENTS", POLLING_ENGINE)
