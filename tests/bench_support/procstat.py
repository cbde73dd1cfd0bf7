"""CPU and memory of processes from /proc (Linux only)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own threads, not its children)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the process's threads."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """The process and all its descendants."""
    tree = tree if tree is not None else children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, ()))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def system_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(v) for v in parts[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    total = sum(values)
    return (total - idle) / CLK_TCK, total / CLK_TCK


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


class CpuMeter:
    """CPU used by groups of processes (each with its descendants, found at
    start and at stop) between start() and stop(), and by the whole machine:
    what is left is other load on the machine (noise)."""

    def __init__(self, groups: dict[str, Iterable[int]], exact: Iterable[str] = (), count_switches: bool = False):
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.exact = set(exact)  # groups counted without their descendants
        self.count_switches = count_switches
        self.switches: dict[str, int] = {}
        self._start: dict[str, dict[int, float]] = {}
        self.seconds = 0.0
        self.used: dict[str, float] = {}
        self.system = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        tree = children_map()
        sample = {}
        switches = {}
        for name, roots in self.groups.items():
            if name in self.exact:
                pids = set(roots)
            else:
                pids = {p for root in roots for p in descendants(root, tree)}
            sample[name] = {p: cpu_seconds(p) for p in pids}
            switches[name] = {p: context_switches(p) for p in pids} if self.count_switches else {}
        self._switches_sample = switches
        return sample

    def start(self) -> CpuMeter:
        self._start = self._sample()
        self._switches0 = self._switches_sample
        self._t0 = time.monotonic()
        self._sys0 = system_busy_seconds()[0]
        return self

    def stop(self) -> dict:
        end = self._sample()
        for name, now in self._switches_sample.items():
            before = self._switches0.get(name, {})
            self.switches[name] = sum(max(0, v - before.get(p, 0)) for p, v in now.items())
        self.seconds = max(1e-9, time.monotonic() - self._t0)
        self.system = system_busy_seconds()[0] - self._sys0
        for name, now in end.items():
            before = self._start.get(name, {})
            # processes that exited in between are not counted (rare here)
            self.used[name] = sum(max(0.0, v - before.get(p, 0.0)) for p, v in now.items())
        return self.report()

    def report(self) -> dict:
        """CPU as % of one core, per group; 'other' is the rest of the machine."""
        ours = sum(self.used.values())
        out = {name: round(100 * v / self.seconds, 1) for name, v in self.used.items()}
        out["other"] = round(100 * max(0.0, self.system - ours) / self.seconds, 1)
        out["machine"] = round(100 * self.system / self.seconds, 1)
        return out
