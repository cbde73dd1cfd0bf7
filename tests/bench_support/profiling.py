"""Sampling profiles of service processes with py-spy (raw collapsed stacks),
summarised as the functions with the largest self and inclusive shares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 100  # samples per second
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recording:
    """py-spy record --gil --threads --format raw on one pid for `duration` s.
    --gil samples only the thread holding the GIL: the shares are of the
    process's Python (interpreter) time, which is what a GIL-bound service
    is limited by."""

    def __init__(self, pid: int, out: Path, duration: float, gil: bool = True, native: bool = False):
        self.pid, self.out, self.duration = pid, out, duration
        exe = py_spy()
        self.process = None
        self.error = None
        if exe is None:
            self.error = "py-spy is not installed (.venv/bin/pip install py-spy)"
            return
        command = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(round(duration)))),
                   "--rate", str(RATE), "--format", "raw", "--threads", "-o", str(out)]
        if gil:
            command.append("--gil")
        if native:
            command.append("--native")  # C frames too (grpc's Cython, protobuf's upb)
        else:
            command.append("--nonblocking")  # do not pause the process to sample it
        self.log = open(str(out) + ".log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # our own child, by its pid
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        if not self.out.exists():
            self.error = Path(str(self.out) + ".log").read_text(errors="replace")[-500:]


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def summarise(path: Path, duration: float, top: int = 15) -> dict:
    """Self and inclusive shares of the sampled time, per function, and the
    share per thread. `busy` is sampled time / wall time (GIL busy, with --gil)."""
    self_counts: Counter = Counter()
    incl_counts: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            threads[frames[0].split(": ", 1)[-1]] += n
            frames = frames[1:]
        names = [_short(f) for f in frames]
        total += n
        if names:
            self_counts[names[-1]] += n
        for name in set(names):
            incl_counts[name] += n
    def share(c):
        return round(100 * c / total, 1) if total else 0.0
    return {
        "samples": total,
        "busy_percent": round(100 * total / max(1e-9, duration * RATE), 1),
        "threads": {t: share(c) for t, c in threads.most_common(8)},
        "self": [(f, share(c)) for f, c in self_counts.most_common(top)],
        "inclusive": [(f, share(c)) for f, c in incl_counts.most_common(top * 2)],
    }


def format_summary(role: str, summary: dict) -> str:
    lines = [f"--- {role}: {summary['samples']} samples, GIL busy {summary['busy_percent']}% of wall time; "
             f"threads: " + ", ".join(f"{t} {s}%" for t, s in summary["threads"].items())]
    lines.append("  self%  function")
    lines += [f"  {s:5.1f}  {f}" for f, s in summary["self"]]
    lines.append("  incl%  function")
    lines += [f"  {s:5.1f}  {f}" for f, s in summary["inclusive"]]
    return "\n".join(lines)
