"""Where a job's wall time goes: start-up (the interpreter, Snakemake's script preamble, imports until the job's
code begins), then named phases (setup: model and cache; train; evaluate; writing ...), logged at the end.

On small runs the fixed costs dominate; the log line makes that visible (and `wall_seconds` in train.json and
metrics.json keeps it), so a user knows whether a faster GPU or fewer, larger jobs would help.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

log = logging.getLogger(__name__)


class Phases:
    """Seconds per named phase of one job; `with phases("train"): ...` adds the time spent inside."""

    def __init__(self, startup: float = 0.0) -> None:
        self.seconds: dict[str, float] = {"start-up": startup} if startup else {}
        self._started = time.perf_counter() - startup

    @classmethod
    def from_process_start(cls) -> Phases:
        """Phases of this process, its start-up counted from when the operating system created it."""
        return cls(startup=process_seconds())

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def fork(self) -> Phases:
        """Phases that start from these (their seconds so far, their clock): a job that does several things after
        one set-up (an evaluation job scoring each eval variant) gives each its own record."""
        child = Phases()
        child.seconds, child._started = dict(self.seconds), self._started
        return child

    def summary(self) -> dict[str, float]:
        """Seconds per phase, and `total` (the process's wall time so far)."""
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "total": round(self.total(), 3)}

    def total(self) -> float:
        return time.perf_counter() - self._started

    def log(self) -> None:
        total = self.total()
        parts = ", ".join(f"{name} {s:.1f} s ({s / total:.0%})" for name, s in self.seconds.items())
        log.info("wall time %.1f s: %s", total, parts)


def process_seconds() -> float:
    """Wall seconds since this process was created, to 10 ms: on Linux from the kernel's clock since boot
    (/proc/uptime and /proc/self/stat). psutil's create_time adds that to a boot time in whole seconds on a
    wall clock that may have been stepped since, and read 0.9 s too much on the development machine."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return max(0.0, time.time() - psutil.Process().create_time())
