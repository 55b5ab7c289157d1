"""How many threads a decode step uses, chosen from the step times themselves.

Why: a decode step is ~120 short parallel loops (four per decoder layer), each ending in a barrier.
On a quiet machine two threads beat one; when other processes hold the cores, a thread that is
descheduled makes its partner wait at every barrier for a whole scheduler slice, and the step
collapses (measured: 0.34 tok/s with 2 threads against 4.5 with 1 at load ~19 on 2 cores). The
scheduler's load average lags by a minute, so the governor times the steps instead: it runs the
faster team size it has measured, re-measures the other one for a couple of steps now and then
(backing off while it keeps losing), and starts from one thread when the machine is already busy.
"""
from __future__ import annotations

import os
import time

ALPHA = 0.3  # weight of the newest step in each team size's running time
FIRST_PROBE = 4  # steps before the first measurement of the other team size
PROBE_STEPS = 2  # steps per measurement (the first after a switch warms the new team up)
MAX_INTERVAL = 1024


def busy_elsewhere(cores: int) -> bool:
    """The last minute's load already fills the cores (before we add ours)."""
    try:
        return os.getloadavg()[0] >= cores - 0.5
    except OSError:
        return False


class ThreadGovernor:
    """`with governor.step(): ...` around each decode step; `close()` restores the team size.

    `set_threads(n)` applies a team size (qat.kernels.native.set_threads); `most` is the largest;
    `start` the first choice (default: from the load average); `adapt=False` keeps `start`.
    """

    def __init__(self, set_threads, most: int, interval: int = 64, clock=time.perf_counter,
                 start: int | None = None, adapt: bool = True):
        self.set_threads, self.most, self.clock, self.adapt = set_threads, max(1, most), clock, adapt
        self.base = self.interval = interval
        self.choice = start if start is not None else (
            1 if self.most > 1 and busy_elsewhere(os.cpu_count() or 1) else self.most)
        self.times: dict[int, float] = {}
        self.until_probe, self.probing, self.current = FIRST_PROBE, 0, None
        self.history: list[int] = []  # team size of each step (for tests and reports)

    def _apply(self, n: int) -> None:
        if n != self.current:
            self.set_threads(n)
            self.current = n

    def step(self) -> "_Step":
        if self.most == 1 or not self.adapt:
            threads = self.choice
        elif self.probing:
            threads = self._other()
        elif self.until_probe <= 0:
            self.probing, threads = PROBE_STEPS, self._other()
        else:
            threads = self.choice
        self._apply(threads)
        return _Step(self, threads)

    def _other(self) -> int:
        return 1 if self.choice == self.most else self.most

    def record(self, threads: int, seconds: float) -> None:
        self.history.append(threads)
        if self.most == 1 or not self.adapt:
            return
        if threads == self.choice:  # a running time over the steps of the chosen size
            old = self.times.get(threads)
            self.times[threads] = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds
            self.until_probe -= 1
            return
        if self.probing < PROBE_STEPS:  # a probe: fresh, so it replaces what the size had
            self.times[threads] = seconds   # (its first step after the switch only warms up)
        self.probing -= 1
        if self.probing:
            return
        if self.times.get(threads, float("inf")) < self.times.get(self.choice, float("inf")):
            self.choice, self.interval = threads, self.base  # the other size won: switch
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)  # it lost again: ask less often
        self.until_probe = self.interval

    def close(self) -> None:
        self._apply(self.most)


class _Step:
    def __init__(self, governor: ThreadGovernor, threads: int):
        self.governor, self.threads = governor, threads

    def __enter__(self) -> "_Step":
        self.start = self.governor.clock()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.governor.record(self.threads, self.governor.clock() - self.start)
