"""A backend for several shards (`dworkers master --shards 0,2|all`): a master
process per shard, each with its own election, journal and interpreter (so
one backend uses as many cores as it runs shards), shard K listening on
--listen's port + K (and --metrics-port + K); one that dies is started again.
With `all` it also starts a master for every shard the map gains later.

Each child is an ordinary `dworkers master --shard K`: a standby or the active
master of its shard, as its election decides."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from dworkers.common import zk
from dworkers.common.errors import ConfigError
from dworkers.common.lifecycle import StopRequest
from dworkers.common.routing import ShardMapFollower
from dworkers.common.shards import MAX_SHARDS

log = logging.getLogger(__name__)

RESTART_DELAY = (1.0, 30.0)  # first and longest pause before starting a dead child again


def parse_shards(text: str) -> list[int] | None:
    """`0,2,5` as shards, or None for `all`."""
    if text.strip() == "all":
        return None
    try:
        shards = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--shards {text!r}: expected all, or shard numbers like 0,2,5") from None
    if not shards or not all(0 <= s < MAX_SHARDS for s in shards):
        raise ConfigError(f"--shards {text!r}: shard numbers are 0 to {MAX_SHARDS - 1}")
    return shards


def offset(address: str, by: int) -> str:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        raise ConfigError(f"{address!r}: --shards needs a fixed port (shard K listens on port + K)")
    if int(port) + by > 65535:
        raise ConfigError(f"{address!r}: shard {by} would listen past port 65535")
    return f"{host}:{int(port) + by}"


class Child:
    def __init__(self, shard: int, argv: list[str]):
        self.shard, self.argv = shard, argv
        self.process: subprocess.Popen | None = None
        self.delay = RESTART_DELAY[0]
        self.next_start = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=_end_with_parent)
        self.started = time.monotonic()
        log.info("started the master of shard %d (pid %d)", self.shard, self.process.pid)


class ShardGroup:
    def __init__(self, settings, argv: list[str]):
        self.settings = settings
        self.argv = argv  # this process's own arguments, `master` first
        self.children: dict[int, Child] = {}
        self._lock = threading.Lock()

    def child_argv(self, shard: int) -> list[str]:
        s = self.settings
        extra = ["--shards", "", "--shard", str(shard), "--listen", offset(s.listen, shard),
                 "--metrics-port", str(s.metrics_port + shard if s.metrics_port else 0)]
        if s.advertise:
            extra += ["--advertise", offset(s.advertise, shard)]
        return [sys.executable, "-m", "dworkers.cli", *self.argv, *extra]  # later flags win

    def add(self, shards) -> None:
        with self._lock:
            for shard in shards:
                if shard not in self.children:
                    child = self.children[shard] = Child(shard, self.child_argv(shard))
                    child.start()

    def run(self, stop: StopRequest) -> None:
        wanted = parse_shards(self.settings.shards)
        for shard in wanted or ():
            offset(self.settings.listen, shard)  # every port is valid before any child starts
        client = None
        if wanted is None:
            c = self.settings.cluster
            client = zk.connect(c.zk, connect_timeout=10.0, auth=c.zk_auth(), tls=c.zk_tls())
            follower = ShardMapFollower(client, zk.Paths(c.root).shard_map)
            follower.on_change(lambda new: self.add(range(new.shards)))
            self.add(range(follower.current.shards))
        else:
            self.add(wanted)
        try:
            while not stop.wait(0.5):
                self._restart_dead()
        finally:
            self._stop_children()
            if client is not None:
                zk.stop(client)

    def _restart_dead(self) -> None:
        now = time.monotonic()
        with self._lock:
            for child in self.children.values():
                if child.process is None or child.process.poll() is None:
                    continue
                if child.next_start == 0.0:
                    if now - child.started > 60:
                        child.delay = RESTART_DELAY[0]  # it had run well: not a crash loop
                    child.next_start = now + child.delay
                    log.warning("the master of shard %d exited (status %s): starting it again in %.0f s",
                                child.shard, child.process.returncode, child.delay)
                    child.delay = min(child.delay * 2, RESTART_DELAY[1])
                elif now >= child.next_start:
                    child.next_start = 0.0
                    child.start()

    def _stop_children(self) -> None:
        """SIGTERM to each (its master resigns and finishes its calls), then waits."""
        with self._lock:
            running = [c.process for c in self.children.values() if c.process is not None and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.settings.shutdown_grace + 4  # within this process's own stop deadline
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def _end_with_parent() -> None:
    """In the child: SIGTERM when this group process dies (even by kill -9),
    so that no master outlives its backend."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: children outlive a killed group


def main(settings, stop: StopRequest) -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] != "master":
        raise ConfigError("--shards: run as `dworkers master --shards ...`")
    log.info("a master for shards %s, pid %d", settings.shards, os.getpid())
    ShardGroup(settings, argv).run(stop)
